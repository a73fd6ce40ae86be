"""MHE, minimum hyperspherical energy (Liu et al., NeurIPS 2018), as a regularizer object."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_hsu.functional import hyperspherical_energy
from lightning_hsu.functional._common import DEFAULT_EPS
from lightning_hsu.functional._matmul import PRODUCT_PRECISIONS, ProductPrecision
from lightning_hsu.regularizers.base import Capturable
from lightning_hsu.validation import choice, flag, optional_positive_int, positive_float


class MHE(Capturable):
    """Minimum hyperspherical energy (Liu et al., NeurIPS 2018); see
    `hyperspherical_energy`.

    Args:
        power: Riesz exponent s >= 0 (0: log energy).
        distance: ``"euclidean"`` or ``"angular"``.
        half_space: use the neurons and their negations (papers: hidden layers).
        eps: normaliser of the official code.
        chunk_size: rows per block (``None``: automatic).
        precision: operands of the Gram and gradient products: ``"float32"`` (default),
            ``"tf32"`` or ``"bfloat16"`` (faster on a GPU; errors and when they are safe in
            `docs/performance.md`). Through the callback: ``options={"precision": "tf32"}``.

    Examples:
        >>> import torch
        >>> tri = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])  # 120 degrees apart
        >>> from lightning_hsu.regularizers import MHE
        >>> round(float(MHE(power=2.0, half_space=True)(tri)), 4)
        0.5833
    """

    neurons_only = True

    name = "mhe"
    supports_sharding = True
    capturable = True
    batchable = True

    def __init__(
        self,
        power: float = 2.0,
        distance: Literal["euclidean", "angular"] = "euclidean",
        half_space: bool = False,
        eps: float = DEFAULT_EPS,
        chunk_size: int | None = None,
        precision: ProductPrecision = "float32",
    ) -> None:
        super().__init__()
        self.power = positive_float("MHE", "power", power, allow_zero=True)
        self.distance = choice("MHE", "distance", distance, ("euclidean", "angular"))
        self.half_space = flag("MHE", "half_space", half_space)
        self.eps = positive_float("MHE", "eps", eps)
        self.chunk_size = optional_positive_int("MHE", "chunk_size", chunk_size)
        self.precision = choice("MHE", "precision", precision, PRODUCT_PRECISIONS)

    def penalty(self, neurons: Tensor, *, step: int | None = None, check_finite: bool = True) -> Tensor:
        return hyperspherical_energy(
            neurons,
            power=self.power,
            distance=self.distance,  # type: ignore[arg-type]
            half_space=self.half_space,
            eps=self.eps,
            chunk_size=self.chunk_size,
            shard=self._shard,
            check_finite=check_finite,
            precision=self.precision,  # type: ignore[arg-type]
        )
