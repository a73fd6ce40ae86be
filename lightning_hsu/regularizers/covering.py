"""MHC, minimum hyperspherical covering (Liu et al., AISTATS 2021), as a regularizer object."""

from __future__ import annotations

from torch import Tensor

from lightning_hsu.functional import pole_covering_distance
from lightning_hsu.functional._common import DEFAULT_EPS
from lightning_hsu.functional.covering import pole_covering_slope
from lightning_hsu.regularizers.pole import PoleRegularizer
from lightning_hsu.validation import positive_float


class MHC(PoleRegularizer):
    """Minimum hyperspherical covering: the pole maximises its smooth distance to the nearest
    neuron \\(S(v)\\), the neurons minimise it (see
    `pole_covering_distance`); ``gamma`` = 10 officially."""

    neurons_only = True

    name = "mhc"

    def __init__(
        self,
        gamma: float = 10.0,
        half_space: bool = False,
        inner_steps: int = 10,
        pole_lr: float = 0.1,
        pole_momentum: float = 0.9,
        pole_weight_decay: float = 5e-4,
        seed: int = 0,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__(half_space, inner_steps, pole_lr, pole_momentum, pole_weight_decay, seed, eps)
        self.gamma = positive_float("MHC", "gamma", gamma)

    def pole_objective(self, neurons: Tensor, pole: Tensor, *, normalized: bool = False) -> Tensor:
        return -pole_covering_distance(
            neurons, pole, gamma=self.gamma, half_space=self.half_space, eps=self.eps, normalized=normalized
        )

    def pole_slope(self, cos: Tensor) -> Tensor:
        return -pole_covering_slope(cos, self.gamma)  # the pole maximises S

    def neuron_penalty(self, neurons: Tensor, pole: Tensor) -> Tensor:
        return pole_covering_distance(neurons, pole, gamma=self.gamma, half_space=self.half_space, eps=self.eps)
