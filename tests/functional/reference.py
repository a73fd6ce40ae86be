"""Plain references for the fast paths: the official concatenation formulation with autograd.

Independent of :mod:`lightning_hsu.functional.pairwise`: ``[W; -W]`` for half-space, the full
matrix, the strict upper triangle (Liu et al., NeurIPS 2018, ``wy1iu/MHE``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def concat_energy(w: Tensor, power: float, half_space: bool, eps: float = 1e-4) -> Tensor:
    """Mean Riesz energy (``-log d^2`` for ``power == 0``) over the unordered pairs, by concatenation."""
    x = torch.cat([w, -w]) if half_space else w
    x = x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    sq = (2.0 - 2.0 * (x @ x.T))[i, j]
    values = -torch.log(sq) if power == 0 else sq.pow(-power / 2.0)
    return values.mean()


def value_and_grad(fn, w: Tensor) -> tuple[Tensor, Tensor]:
    leaf = w.detach().clone().requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


# ---- float64 statements of the pair sums, pair by pair (the fused kernel's tests) -------------------
def unit_rows(w: Tensor, eps: float = 1e-4) -> Tensor:
    """The official normaliser \\(w / \\sqrt{\\lVert w\\rVert^2 + \\epsilon}\\)."""
    return w / torch.sqrt((w * w).sum(-1, keepdim=True) + eps)


def pair_squared_distances(unit: Tensor, half_space: bool) -> Tensor:
    """``d^2 = 2 - 2c`` of every unordered pair of the rows (of ``[U; -U]`` in half space), ``[..., P]``
    (the official code's distance: with \\(\\epsilon\\) the rows are just inside the sphere)."""
    x = torch.cat([unit, -unit], dim=-2) if half_space else unit
    n = x.shape[-2]
    i, j = torch.triu_indices(n, n, offset=1)
    return 2.0 - 2.0 * (x @ x.transpose(-1, -2))[..., i, j]


def clamped_riesz(sq: Tensor, power: float) -> Tensor:
    """\\(d^{-s}\\), or \\(-\\log d^2\\) for s = 0, with \\(d^2\\) clamped at 1e-6."""
    clamped = sq.clamp_min(1e-6)
    return -torch.log(clamped) if power == 0 else clamped.pow(-power / 2.0)


def pairwise_energy(w: Tensor, power: float, half_space: bool) -> Tensor:
    """MHE: the mean over the pairs of the clamped Riesz kernel."""
    return clamped_riesz(pair_squared_distances(unit_rows(w), half_space), power).mean(-1)


def pairwise_uniformity(w: Tensor, t: float, half_space: bool) -> Tensor:
    """Wang-Isola: \\(\\log\\) of the mean over the pairs of \\(e^{-t d^2}\\)."""
    return torch.log(torch.exp(-t * pair_squared_distances(unit_rows(w), half_space)).mean(-1))


def pairwise_separation(w: Tensor, half_space: bool, tie_rtol: float = 1e-5) -> Tensor:
    """Hard MHS: minus the sum of ``d^2`` over the pairs within a relative ``tie_rtol`` of the smallest."""
    sq = pair_squared_distances(unit_rows(w), half_space)
    smallest = sq.detach().amin(-1, keepdim=True)
    tied = sq.detach() <= smallest + tie_rtol * smallest.abs() + 1e-12
    return -(sq * tied).sum(-1)


def pairwise_compressive(w: Tensor, projections: Tensor, half_space: bool) -> Tensor:
    """CoMHE: the mean over the projections \\(P_k\\) of the MHE (s = 2) of \\(W P_k^\\top\\)."""
    return torch.stack([pairwise_energy(w @ p.T, 2.0, half_space) for p in projections]).mean()
