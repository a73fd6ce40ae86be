"""Regularizers by name, for string configs (``regularizer="mhe"``) and the CLI."""

from __future__ import annotations

from typing import Any

from lightning_hsu.regularizers.base import Regularizer
from lightning_hsu.regularizers.compressive import CoMHE
from lightning_hsu.regularizers.covering import MHC
from lightning_hsu.regularizers.energy import MHE
from lightning_hsu.regularizers.gram_determinant import MGD
from lightning_hsu.regularizers.polarization import MHP, RMHP
from lightning_hsu.regularizers.separation import MHS
from lightning_hsu.regularizers.uniformity import Uniformity

REGULARIZERS: dict[str, type[Regularizer]] = {
    cls.name: cls for cls in (MHE, MHS, MHP, MHC, MGD, RMHP, CoMHE, Uniformity)
}


def make_regularizer(spec: str | Regularizer, **kwargs: Any) -> Regularizer:
    """Build a regularizer from a name (``"mhe"``, ``"mhs"``, ...) and options, or pass one through.

    Raises:
        ValueError: unknown name, or options given together with an instance.
    """
    if isinstance(spec, Regularizer):
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} were given with a ready {spec!r}; put them in its constructor")
        return spec
    if not isinstance(spec, str) or spec.lower() not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {spec!r}; choose one of {sorted(REGULARIZERS)}")
    cls = REGULARIZERS[spec.lower()]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"regularizer {spec!r}: {err}") from None
