"""MGD, maximum Gram determinant (Liu et al., AISTATS 2021), as a regularizer object."""

from __future__ import annotations

from torch import Tensor

from lightning_hsu.functional import (
    gram_determinant_penalty,
)
from lightning_hsu.functional._common import DEFAULT_EPS
from lightning_hsu.regularizers.base import Regularizer
from lightning_hsu.validation import flag, positive_float


class MGD(Regularizer):
    """Maximum Gram determinant, \\(-\\log\\det(e^{-d^2} + 10^{-6} I)\\) (Liu et al., AISTATS 2021)."""

    neurons_only = True

    name = "mgd"

    def __init__(self, half_space: bool = False, jitter: float = 1e-6, eps: float = DEFAULT_EPS) -> None:
        super().__init__()
        self.half_space = flag("MGD", "half_space", half_space)
        self.jitter = positive_float("MGD", "jitter", jitter)
        self.eps = positive_float("MGD", "eps", eps)

    def penalty(self, neurons: Tensor, *, step: int | None = None, check_finite: bool = True) -> Tensor:
        return gram_determinant_penalty(neurons, half_space=self.half_space, eps=self.eps, jitter=self.jitter)
