"""MHP, maximum hyperspherical polarization, and its relaxed closed form R-MHP (Liu et al.,
AISTATS 2021), as regularizer objects."""

from __future__ import annotations

from torch import Tensor

from lightning_hsu.functional import (
    pole_energy,
    relaxed_polarization,
)
from lightning_hsu.functional.polarization import pole_energy_slope
from lightning_hsu.regularizers.base import Capturable
from lightning_hsu.regularizers.pole import PoleRegularizer


class MHP(PoleRegularizer):
    """Maximum hyperspherical polarization: the pole minimises the Riesz-2 energy at itself,
    \\(E(v)\\), and the neurons minimise \\(-E(v)\\) (see
    `pole_energy`)."""

    neurons_only = True

    name = "mhp"

    def pole_objective(self, neurons: Tensor, pole: Tensor, *, normalized: bool = False) -> Tensor:
        return pole_energy(neurons, pole, half_space=self.half_space, eps=self.eps, normalized=normalized)

    def pole_slope(self, cos: Tensor) -> Tensor:
        return pole_energy_slope(cos)

    def neuron_penalty(self, neurons: Tensor, pole: Tensor) -> Tensor:
        return -pole_energy(neurons, pole, half_space=self.half_space, eps=self.eps)


class RMHP(Capturable):
    """Relaxed polarization \\(\\lVert\\sum_i w_i\\rVert_2\\) on unnormalised weights (Liu et al.,
    AISTATS 2021). It has no half-space form (a neuron and its negation cancel)."""

    neurons_only = True

    name = "rmhp"
    capturable = True
    batchable = True

    def penalty(self, neurons: Tensor, *, step: int | None = None, check_finite: bool = True) -> Tensor:
        return relaxed_polarization(neurons, check_finite=check_finite)
