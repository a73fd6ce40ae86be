r"""Minimum hyperspherical covering (MHC): Liu et al., *Learning with Hyperspherical Uniformity*,
AISTATS 2021.

A learnable pole :math:`v` measures the smooth distance to its nearest neuron,

.. math:: S(v) = -\frac1\gamma \log\Big(\frac1N\sum_i e^{-\gamma\, d^2(\hat v, \hat w_i)}\Big),

which the pole maximises (it seeks the largest hole) and the neurons minimise (they cover it): a
relaxation of :math:`\min_W\max_v\min_i d(v, w_i)`. :math:`\gamma = 10` officially.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_hsu.functional._common import DEFAULT_EPS, full_precision
from lightning_hsu.functional.polarization import pole_cosines


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
    """Smooth nearest-neuron squared distance :math:`S(v)` of the pole (log-sum-exp form).

    ``normalized``: see :func:`~lightning_hsu.functional.polarization.pole_cosines`.
    """
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    cos = pole_cosines(neurons, pole, half_space=half_space, eps=eps, normalized=normalized)
    sq = 2.0 - 2.0 * cos
    return -(torch.logsumexp(-gamma * sq, dim=0) - math.log(sq.shape[0])) / gamma


def pole_covering_slope(cos: Tensor, gamma: float) -> Tensor:
    r""":math:`\partial S/\partial c_i = -2\,\mathrm{softmax}_i(-\gamma d^2)` of the smooth distance
    :math:`S` at the ``[N]`` cosines of :func:`~lightning_hsu.functional.polarization.pole_cosines`
    (:math:`d^2_i = 2 - 2c_i`): the nearest neurons pull hardest. For the pole's steps in closed
    form."""
    return torch.softmax(-gamma * (2.0 - 2.0 * cos), dim=0).mul_(-2.0)
