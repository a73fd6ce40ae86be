"""MHS, maximum hyperspherical separation (Liu et al., AISTATS 2021), as a regularizer object."""

from __future__ import annotations

from torch import Tensor

from lightning_hsu.functional import (
    hyperspherical_separation,
    soft_hyperspherical_separation,
)
from lightning_hsu.functional._common import DEFAULT_EPS
from lightning_hsu.regularizers.base import Capturable
from lightning_hsu.validation import flag, optional_positive_int, positive_float


class MHS(Capturable):
    """Maximum hyperspherical separation (Tammes; Liu et al., AISTATS 2021).

    ``temperature=None`` is the official hard max-min (ties summed, gradient through the closest
    pairs only); a positive ``temperature`` gives the smooth soft-min variant.

    Examples:
        >>> import torch
        >>> tri = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])  # 120 degrees apart
        >>> from lightning_hsu.regularizers import MHS
        >>> round(float(MHS()(tri)), 3)
        -9.0
    """

    neurons_only = True

    name = "mhs"
    capturable = True
    batchable = True

    def __init__(
        self,
        half_space: bool = False,
        temperature: float | None = None,
        eps: float = DEFAULT_EPS,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.half_space = flag("MHS", "half_space", half_space)
        self.temperature = None if temperature is None else positive_float("MHS", "temperature", temperature)
        self.eps = positive_float("MHS", "eps", eps)
        self.chunk_size = optional_positive_int("MHS", "chunk_size", chunk_size)

    def penalty(self, neurons: Tensor, *, step: int | None = None, check_finite: bool = True) -> Tensor:
        options = dict(half_space=self.half_space, eps=self.eps, chunk_size=self.chunk_size, check_finite=check_finite)
        if self.temperature is None:
            return hyperspherical_separation(neurons, **options)  # type: ignore[arg-type]
        return soft_hyperspherical_separation(neurons, temperature=self.temperature, **options)  # type: ignore[arg-type]
