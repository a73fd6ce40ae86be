r"""Minimum hyperspherical covering (MHC): Liu et al., *Learning with Hyperspherical Uniformity*,
AISTATS 2021.

A learnable pole \(v\) measures the smooth distance to its nearest neuron,

\[
S(v) = -\frac1\gamma \log\Big(\frac1N\sum_i e^{-\gamma\, d^2(\hat v, \hat w_i)}\Big),
\]

which the pole maximises (it seeks the largest hole) and the neurons minimise (they cover it): a
relaxation of \(\min_W\max_v\min_i d(v, w_i)\). \(\gamma = 10\) officially.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_hsu.functional._common import DEFAULT_EPS, full_precision
from lightning_hsu.functional.polarization import fixed_pole_of_neurons, fixed_pole_penalty, pole_cosines


@full_precision
def pole_covering_distance(
    neurons: Tensor,
    pole: Tensor,
    *,
    gamma: float = 10.0,
    half_space: bool = False,
    eps: float = DEFAULT_EPS,
    normalized: bool = False,
) -> Tensor:
    """Smooth nearest-neuron squared distance \\(S(v)\\) of the pole (log-sum-exp form).

    ``normalized``: see `pole_cosines`. For a fixed pole (the neurons' penalty of `MHC`) the
    gradient with respect to the neurons is formed in closed form in the forward pass
    (`fixed_pole_penalty`, with `pole_covering_slope`).
    """
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")

    def value(cos: Tensor) -> Tensor:
        sq = 2.0 - 2.0 * cos
        return -(torch.logsumexp(-gamma * sq, dim=0) - math.log(sq.shape[0])) / gamma

    if fixed_pole_of_neurons(neurons, pole, normalized):
        return fixed_pole_penalty(
            neurons, pole, half_space, eps, lambda cos: (value(cos), pole_covering_slope(cos, gamma))
        )
    return value(pole_cosines(neurons, pole, half_space=half_space, eps=eps, normalized=normalized))


def pole_covering_slope(cos: Tensor, gamma: float) -> Tensor:
    r"""\(\partial S/\partial c_i = -2\,\mathrm{softmax}_i(-\gamma d^2)\) of the smooth distance
    \(S\) at the ``[N]`` cosines of `pole_cosines`
    (\(d^2_i = 2 - 2c_i\)): the nearest neurons pull hardest. For the pole's steps in closed
    form."""
    return torch.softmax(-gamma * (2.0 - 2.0 * cos), dim=0).mul_(-2.0)
