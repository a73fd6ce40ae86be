"""Point configurations with known angles, built independently of the library."""

from __future__ import annotations

import math

import torch


def regular_simplex(n: int, d: int | None = None) -> torch.Tensor:
    """n unit vectors with all pairwise cosines -1/(n-1), in R^d (d >= n; default n)."""
    d = n if d is None else d
    centred = torch.eye(n, dtype=torch.float64) - 1.0 / n
    centred = centred / centred.norm(dim=1, keepdim=True)
    out = torch.zeros(n, d, dtype=torch.float64)
    out[:, :n] = centred
    # A random rotation, so no test depends on axis-aligned coordinates.
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(n)))
    return out @ q


def cross_polytope(d: int) -> torch.Tensor:
    """The 2d vectors ±e_k."""
    eye = torch.eye(d, dtype=torch.float64)
    return torch.cat([eye, -eye])


def icosahedron() -> torch.Tensor:
    """The 12 vertices (0, ±1, ±φ) and cyclic permutations, normalised."""
    phi = (1 + math.sqrt(5)) / 2
    points = []
    for a in (-1.0, 1.0):
        for b in (-phi, phi):
            points += [(0.0, a, b), (a, b, 0.0), (b, 0.0, a)]
    x = torch.tensor(points, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def dense_angles(x: torch.Tensor, half_space: bool = False) -> torch.Tensor:
    """All pairwise angles (degrees, i<j) by the textbook formula, in float64."""
    u = x.double() / x.double().norm(dim=1, keepdim=True)
    c = (u @ u.T).clamp(-1, 1)
    if half_space:
        c = c.abs()
    i, j = torch.triu_indices(len(x), len(x), 1)
    return torch.rad2deg(torch.arccos(c[i, j]))
