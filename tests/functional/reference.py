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
