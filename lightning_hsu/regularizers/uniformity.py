"""The Wang–Isola uniformity (ICML 2020) of a layer's neurons, as a regularizer object."""

from __future__ import annotations

from torch import Tensor

from lightning_hsu.functional import uniformity
from lightning_hsu.functional._common import DEFAULT_EPS
from lightning_hsu.regularizers.base import Capturable
from lightning_hsu.validation import flag, optional_positive_int, positive_float


class Uniformity(Capturable):
    """Wang–Isola uniformity of the neurons, \\(\\log\\) mean \\(e^{-t d^2}\\); see
    `uniformity`."""

    neurons_only = True

    name = "uniformity"
    capturable = True
    batchable = True

    def __init__(
        self, t: float = 2.0, half_space: bool = False, eps: float = DEFAULT_EPS, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        self.t = positive_float("Uniformity", "t", t)
        self.half_space = flag("Uniformity", "half_space", half_space)
        self.eps = positive_float("Uniformity", "eps", eps)
        self.chunk_size = optional_positive_int("Uniformity", "chunk_size", chunk_size)

    def penalty(self, neurons: Tensor, *, step: int | None = None, check_finite: bool = True) -> Tensor:
        return uniformity(
            neurons,
            t=self.t,
            half_space=self.half_space,
            eps=self.eps,
            chunk_size=self.chunk_size,
            check_finite=check_finite,
        )
