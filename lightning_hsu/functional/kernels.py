r"""Pair kernels \(f(c)\) of the cosine \(c = \hat w_i\cdot\hat w_j\) of two unit neurons.

Every pairwise energy of the papers is a sum of one such kernel over pairs of neurons, written
as a function of the cosine because both distances follow from it:
\(d^2 = 2 - 2c\) (chordal) and \(\theta = \arccos c\) (geodesic). Each kernel returns the
value and, on request, the derivative \(f'(c)\); `
pairwise_kernel_sum` uses the derivative to form the gradient in closed form, block by block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hsu.validation import positive_float

#: Smallest squared chordal distance a Riesz or log kernel sees. The official code adds 1 on the
#: diagonal only, so duplicate neurons give inf there; clamping keeps value and gradient finite.
MIN_SQUARED_DISTANCE = 1e-6
#: Cosines are clamped to ``[-1 + d, 1 - d]`` before ``arccos``, whose derivative is infinite at
#: +-1 (the official angular code does not clamp and can produce NaN).
COSINE_MARGIN = 1e-6
#: The official angular kernels use ``theta / pi + 1e-4``.
ANGLE_OFFSET = 1e-4


class PairKernel:
    """A function of the cosine between two unit neurons, with its derivative.

    Kernels are called on ``[batch, rows, m]`` blocks of cosines and on ``[batch, rows]`` squared
    norms; a parameter given as a ``[batch]`` tensor applies per batch element (`per_batch`).
    """

    def __call__(self, cos: Tensor, with_derivative: bool) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def antipodal_sum(
        self, cos: Tensor, with_derivative: bool, *, derivative_scale: float = 1.0, host_sync: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        r"""The half-space term of a pair, \(f(c) + f(-c)\), and ``derivative_scale`` times its
        derivative \(f'(c) - f'(-c)\) (Liu et al. 2018: the pair \((i, j)\) with \((i, -j)\)).

        ``host_sync``: a kernel may then take a faster formula after checking the data on the
        host (free on the CPU); without it no decision is made on the data (CUDA-graph safe).
        """
        value, deriv = self(cos, with_derivative)
        value_neg, deriv_neg = self(-cos, with_derivative)
        value.add_(value_neg)
        if deriv is None:
            return value, None
        assert deriv_neg is not None
        deriv.sub_(deriv_neg)
        return value, deriv if derivative_scale == 1.0 else deriv.mul_(derivative_scale)


def per_batch(parameter: float | Tensor, like: Tensor) -> float | Tensor:
    """``parameter`` shaped to broadcast against ``like`` (``[batch, ...]``): a ``[batch]`` tensor
    gets trailing unit dimensions; a number or 0-d tensor is returned as is."""
    if isinstance(parameter, Tensor) and parameter.dim() == 1:
        return parameter.reshape(parameter.shape + (1,) * (like.dim() - 1))
    return parameter


@dataclass(frozen=True)
class RieszKernel(PairKernel):
    r"""Euclidean Riesz kernel \(f_s = (d^2)^{-s/2}\) for \(s > 0\), and
    \(f_0 = -\log d^2\) for \(s = 0\) (the official ``'0'``, twice the log energy).

    \(d^2 = \max(2 - 2c, 10^{-6})\).
    """

    power: float

    def __call__(self, cos: Tensor, with_derivative: bool) -> tuple[Tensor, Tensor | None]:
        # few passes, each into a fresh or reused temporary: this runs on every Gram entry twice
        raw = torch.rsub(cos, 2.0, alpha=2.0)  # 2 - 2c
        sq = raw.clamp_min(MIN_SQUARED_DISTANCE)
        deriv: Tensor | None
        if self.power == 0:
            value = torch.log(sq).neg_()
            deriv = sq.reciprocal_().mul_(2.0) if with_derivative else None
        elif self.power == 2.0:  # the papers' default: 1 / d^2, derivative 2 / d^4
            value = sq.reciprocal_()
            deriv = value.square().mul_(2.0) if with_derivative else None
        else:
            value = sq.pow(-self.power / 2.0)
            # d/dc (2 - 2c)^(-s/2) = s (2 - 2c)^(-s/2 - 1)
            deriv = value.div(sq).mul_(self.power) if with_derivative else None
        if deriv is not None:
            deriv = torch.where(raw > MIN_SQUARED_DISTANCE, deriv, 0.0)
        return value, deriv

    def antipodal_sum(
        self, cos: Tensor, with_derivative: bool, *, derivative_scale: float = 1.0, host_sync: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        r"""For \(s = 2\) and \(s = 0\) on the CPU, \(f(c) + f(-c)\) in closed form.

        With \(q = (1 - c)(1 + c)\) (no cancellation near \(c = \pm 1\), unlike
        \(1 - c^2\)): \(s = 2\) gives \(\frac{1}{2-2c} + \frac{1}{2+2c} = 1/q\) with
        derivative \(2c/q^2\); \(s = 0\) gives \(-\log(2-2c) - \log(2+2c) = -\log 4q\)
        with derivative \(2c/q\). About 8 passes over the block instead of 18, the same values
        to float rounding, used when no pair reaches the clamp \(d^2 \le 10^{-6}\) on either
        side (checked on the host; otherwise, and on a GPU, where that check would be a device
        sync, the two clamped evaluations).
        """
        fast = host_sync and self.power in (0.0, 2.0) and cos.device.type == "cpu" and cos.numel() > 0
        if not fast:
            return super().antipodal_sum(cos, with_derivative, derivative_scale=derivative_scale)
        q = torch.rsub(cos, 1.0).mul_(torch.add(cos, 1.0))
        # q <= 1e-6 once 2 - 2c or 2 + 2c <= 1e-6; a margin of 4 keeps float rounding clear of it
        if not bool(q.amin() > 4.0 * MIN_SQUARED_DISTANCE):  # also for NaN
            return super().antipodal_sum(cos, with_derivative, derivative_scale=derivative_scale)
        if self.power == 2.0:
            value = q.reciprocal_()
            deriv = torch.mul(cos, value).mul_(value).mul_(2.0 * derivative_scale) if with_derivative else None
            return value, deriv
        deriv = torch.div(cos, q).mul_(2.0 * derivative_scale) if with_derivative else None
        return q.log_().add_(math.log(4.0)).neg_(), deriv


@dataclass(frozen=True)
class AngularKernel(PairKernel):
    r"""Angular kernel on \(\tilde\theta = \arccos(c)/\pi + 10^{-4}\) (official ``'a0' 'a1' 'a2'``):
    \(-\log\tilde\theta\) for \(s = 0\), \(\tilde\theta^{-s}\) for \(s > 0\).

    Unlike the official code, \(c\) is clamped to \([-1 + 10^{-6}, 1 - 10^{-6}]\) first.
    """

    power: float

    def __call__(self, cos: Tensor, with_derivative: bool) -> tuple[Tensor, Tensor | None]:
        inside = (cos > -1.0 + COSINE_MARGIN) & (cos < 1.0 - COSINE_MARGIN)
        c = cos.clamp(-1.0 + COSINE_MARGIN, 1.0 - COSINE_MARGIN)
        theta = torch.arccos(c) / math.pi + ANGLE_OFFSET
        if self.power == 0:
            value = -torch.log(theta)
            outer = -1.0 / theta  # d/dtheta of -log(theta)
        else:
            value = theta.pow(-self.power)
            outer = -self.power * value / theta
        if not with_derivative:
            return value, None
        dtheta = -1.0 / (math.pi * torch.sqrt(1.0 - c * c))
        deriv = torch.where(inside, outer * dtheta, torch.zeros_like(outer))
        return value, deriv


@dataclass(frozen=True)
class GaussianKernel(PairKernel):
    r"""Gaussian kernel \(\exp(-t\,d^2 - m) = \exp(2t(c - 1) - m)\).

    ``shift`` (\(m\)) is a constant subtracted in the exponent so that a log-sum-exp of the
    kernel never underflows; callers add it back after the log (Wang & Isola, ICML 2020). A tensor
    shift (0-d, or ``[batch]``: one per batch element) stays on the device (no host sync).
    """

    t: float
    shift: float | Tensor = 0.0

    def __call__(self, cos: Tensor, with_derivative: bool) -> tuple[Tensor, Tensor | None]:
        value = torch.exp(2.0 * self.t * (cos - 1.0) - per_batch(self.shift, cos))
        return value, (2.0 * self.t * value if with_derivative else None)


@dataclass(frozen=True)
class ClosestPairsKernel(PairKernel):
    r"""Hard MHS as a pair kernel: \(f(c) = -d^2 = 2c - 2\) for the pairs whose cosine reaches
    ``threshold`` (the closest pairs and their ties), 0 for the others.

    Its pair sum is \(-\sum_{\text{closest pairs}} d^2\), with the official multiplicities in
    half space. The threshold is a tensor (0-d, or ``[batch]``: one per batch element) that
    stays on the device: the sum then needs no host decision (CUDA-graph safe), at the price of a
    dense gradient product that the sparse closed form of
    `hyperspherical_separation` avoids.
    """

    threshold: Tensor

    def __call__(self, cos: Tensor, with_derivative: bool) -> tuple[Tensor, Tensor | None]:
        closest = (cos >= per_batch(self.threshold, cos)).to(cos.dtype)
        value = torch.rsub(cos, 1.0).mul_(-2.0).mul_(closest)  # 2c - 2 on the closest pairs
        return value, (closest.mul(2.0) if with_derivative else None)


def energy_kernel(power: float, distance: str) -> PairKernel:
    """The MHE kernel for a Riesz ``power`` (0 = log) and ``distance`` ('euclidean'/'angular')."""
    positive_float("energy_kernel", "power", power, allow_zero=True)  # 0 is the log energy
    if distance == "euclidean":
        return RieszKernel(float(power))
    if distance == "angular":
        return AngularKernel(float(power))
    raise ValueError(f"distance must be 'euclidean' or 'angular', got {distance!r}")
