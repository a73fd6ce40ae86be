"""Independent statements of the official formulas (../shared/REFERENCE.md), written the way the
official TF code computes them: concatenate ``[W; -W]`` for half-space, normalise every vector
with ``sqrt(||w||^2 + 1e-4)``, build the *full* matrix and reduce over its upper triangle.

Nothing here imports :mod:`lightning_hsu`: the tests compare the library against these.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

OFFICIAL_EPS = 1e-4


def unit(w: Tensor, eps: float = OFFICIAL_EPS) -> Tensor:
    """``w / sqrt(||w||^2 + eps)`` row by row (the official ``norm``)."""
    return w / torch.sqrt((w * w).sum(-1, keepdim=True) + eps)


def concat(w: Tensor, half_space: bool) -> Tensor:
    """The official half-space trick: the neurons and their negations, ``[W; -W]``."""
    return torch.cat([w, -w], dim=0) if half_space else w


def upper(matrix: Tensor) -> Tensor:
    """The strictly upper-triangular entries (unordered pairs i < j) of a square matrix."""
    n = matrix.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    return matrix[i, j]


def cosine_matrix(w: Tensor, half_space: bool, eps: float = OFFICIAL_EPS) -> Tensor:
    x = unit(concat(w, half_space), eps)
    return x @ x.T


def mhe(
    w: Tensor, power: float, distance: str, half_space: bool, eps: float = OFFICIAL_EPS, cos_margin: float = 0.0
) -> Tensor:
    """Mean over unordered pairs of the official kernels '0' '1' '2' (and any s), 'a0' 'a1' 'a2'.

    ``cos_margin > 0`` clamps cosines to ``[-1 + margin, 1 - margin]`` before ``arccos`` (the
    library's documented deviation; the official code does not clamp).
    """
    c = upper(cosine_matrix(w, half_space, eps))
    if cos_margin > 0:
        c = c.clamp(-1.0 + cos_margin, 1.0 - cos_margin)
    if distance == "euclidean":
        sq = 2.0 - 2.0 * c
        values = -torch.log(sq) if power == 0 else sq.pow(-power / 2.0)
    else:
        theta = torch.arccos(c) / math.pi + 1e-4
        values = -torch.log(theta) if power == 0 else theta.pow(-power)
    return values.mean()


def hard_mhs(w: Tensor, half_space: bool, eps: float = OFFICIAL_EPS, tie_rtol: float = 1e-12) -> Tensor:
    """Official hard MHS: ``-sum`` of every upper-triangular ``d^2`` tied at the minimum.

    The official code ties by exact float equality, which depends on the summation order of the
    matrix product (e.g. entries ``(i, j)`` and ``(-i, -j)`` of the concatenated matrix); a relative
    tolerance of 1e-12 in float64 states the same intent without that accident.
    """
    sq = upper(2.0 - 2.0 * cosine_matrix(w, half_space, eps))
    smallest = sq.min()
    tied = sq <= smallest + tie_rtol * smallest.abs()
    return -sq[tied].sum()


def soft_mhs(w: Tensor, temperature: float, half_space: bool, eps: float = OFFICIAL_EPS) -> Tensor:
    """``tau * log( (1/P) sum_{i<j} exp(-d^2_ij / tau) )`` over the concatenated pairs."""
    sq = upper(2.0 - 2.0 * cosine_matrix(w, half_space, eps))
    return temperature * (torch.logsumexp(-sq / temperature, dim=0) - math.log(sq.numel()))


def mgd(w: Tensor, half_space: bool, eps: float = OFFICIAL_EPS, jitter: float = 1e-6) -> Tensor:
    """Official MGD: ``-logdet(exp(-(2 - 2 X X^T)) + 1e-6 I)``, a 2n x 2n kernel in half-space."""
    x = unit(concat(w, half_space), eps)
    kernel = torch.exp(-(2.0 - 2.0 * (x @ x.T))) + jitter * torch.eye(x.shape[0], dtype=x.dtype)
    return -torch.logdet(kernel)


def pole_cos(w: Tensor, pole: Tensor, half_space: bool, eps: float = OFFICIAL_EPS) -> Tensor:
    x = unit(concat(w, half_space), eps)
    v = pole / torch.sqrt((pole * pole).sum() + eps)
    return x @ v


def mhp_pole_energy(w: Tensor, pole: Tensor, half_space: bool, eps: float = OFFICIAL_EPS) -> Tensor:
    """``E(v) = (1/N) sum_i (2 - 2 cos(v, w_i))^{-1}`` (official ``reduce_sum(final) / n_filt``)."""
    return (2.0 - 2.0 * pole_cos(w, pole, half_space, eps)).pow(-1.0).mean()


def mhc_covering(w: Tensor, pole: Tensor, gamma: float, half_space: bool, eps: float = OFFICIAL_EPS) -> Tensor:
    """``S(v) = -(1/gamma) log( (1/N) sum_i exp(-gamma d^2(v, w_i)) )``, written naively."""
    sq = 2.0 - 2.0 * pole_cos(w, pole, half_space, eps)
    return -torch.log(torch.exp(-gamma * sq).mean()) / gamma


def rmhp(w: Tensor) -> Tensor:
    """``|| sum_i w_i ||_2`` on the raw weights."""
    return torch.sqrt((w.sum(0) ** 2).sum())


def comhe(
    w: Tensor, projections: Tensor, power: float, distance: str, half_space: bool, eps: float = OFFICIAL_EPS
) -> Tensor:
    """Official CoMHE: project the raw neurons with each ``P_k``, MHE of each, averaged (a loop)."""
    total = w.new_zeros(())
    for p in projections:
        total = total + mhe(w @ p.T, power, distance, half_space, eps)
    return total / projections.shape[0]


def wang_isola_uniformity(w: Tensor, t: float, half_space: bool = False, eps: float = OFFICIAL_EPS) -> Tensor:
    """The Wang & Isola one-liner, ``pdist(x)^2`` of the normalised rows (``[W; -W]`` in half-space).

    ``pdist`` measures ``||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 c_ij``, which equals the
    library's ``2 - 2 c_ij`` only for exactly unit rows: compare with a tiny ``eps``.
    """
    return torch.pdist(unit(concat(w, half_space), eps)).pow(2).mul(-t).exp().mean().log()


def gaussian_energy_via_cosine(w: Tensor, t: float, half_space: bool, eps: float = OFFICIAL_EPS) -> Tensor:
    """``log mean_{i<j} exp(-t (2 - 2 c_ij))``: uniformity with the official ``d^2 = 2 - 2c``."""
    sq = upper(2.0 - 2.0 * cosine_matrix(w, half_space, eps))
    return torch.exp(-t * sq).mean().log()
