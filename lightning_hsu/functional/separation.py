r"""Maximum hyperspherical separation (MHS, the Tammes problem): Liu et al., *Learning with
Hyperspherical Uniformity*, AISTATS 2021 (arXiv:2103.01649).

Hard (official): :math:`R = -\min_{i<j} d^2_{ij}`, with every pair tied at the minimum summed, so
that the gradient flows only through the closest pair(s). Smooth: a soft-min with temperature
:math:`\tau`, :math:`R_\tau = \tau \log \frac1P\sum_{i<j} e^{-d^2_{ij}/\tau}`, which tends to the
hard value as :math:`\tau\to 0`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_hsu.functional._common import DEFAULT_EPS, as_batched, check_neurons, full_precision, normalize_neurons
from lightning_hsu.functional._matmul import batched_matmul
from lightning_hsu.functional.pairwise import block_rows_for, extreme_pair_cosine
from lightning_hsu.functional.uniformity import log_mean_exp_pairs


@torch.no_grad()
def _tied_pairs(
    unit: Tensor, threshold: float, *, half_space: bool, chunk_size: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Index pairs whose cosine is at least ``threshold``: rows, cols, signs and multiplicity.

    In half-space, a tie of :math:`c_{ij}` stands twice in the :math:`2n\times 2n` matrix
    (:math:`(i,j)` and :math:`(-i,-j)`), a tie of :math:`-c_{ij}` twice (:math:`(i,-j)`,
    :math:`(j,-i)`) and the antipodal pair :math:`(i,-i)` once: the official code sums all.
    """
    n = unit.shape[0]
    rows_per_block = block_rows_for(n, chunk_size)
    found: list[tuple[Tensor, Tensor, float, float]] = []
    for start in range(0, n, rows_per_block):
        stop = min(start + rows_per_block, n)
        cos = batched_matmul(unit[None, start:stop], unit.T[None])[0]
        upper = torch.ones_like(cos, dtype=torch.bool).triu(start + 1)
        signs = (1.0, -1.0) if half_space else (1.0,)
        for sign in signs:
            hit = ((sign * cos) >= threshold) & upper
            i, j = hit.nonzero(as_tuple=True)
            found.append((i + start, j, sign, 2.0 if half_space else 1.0))
        if half_space:
            anti = -(unit[start:stop] * unit[start:stop]).sum(-1)
            (i,) = (anti >= threshold).nonzero(as_tuple=True)
            found.append((i + start, i + start, -1.0, 1.0))
    rows = torch.cat([f[0] for f in found])
    cols = torch.cat([f[1] for f in found])
    signs_t = torch.cat([torch.full_like(f[0], 0, dtype=unit.dtype) + f[2] for f in found])
    mult = torch.cat([torch.full_like(f[0], 0, dtype=unit.dtype) + f[3] for f in found])
    return rows, cols, signs_t, mult


@full_precision
def hyperspherical_separation(
    neurons: Tensor,
    *,
    half_space: bool = False,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
    tie_rtol: float = 1e-5,
) -> Tensor:
    r"""Hard MHS penalty :math:`-\sum_{\text{closest pairs}} d^2_{ij}` (to be minimised).

    Pairs count as tied when their :math:`d^2` is within a relative ``tie_rtol`` of the minimum
    (the official code uses exact float equality, which rounding makes arbitrary: a regular
    tetrahedron computed in float32 then ties all 6 pairs, as it should, giving
    :math:`-6\cdot 8/3`). Returns 0 for fewer than two neurons.
    """
    batched, added = as_batched(normalize_neurons(check_neurons(neurons), eps))
    results = []
    for unit in batched:
        n = unit.shape[0]
        if n < 2:
            results.append(unit.sum() * 0.0)
            continue
        c_max = float(
            extreme_pair_cosine(unit.unsqueeze(0), half_space=half_space, chunk_size=chunk_size, largest=True)[0]
        )
        min_sq = 2.0 - 2.0 * c_max
        threshold = c_max - 0.5 * (tie_rtol * abs(min_sq) + 1e-12)
        rows, cols, signs, mult = _tied_pairs(unit, threshold, half_space=half_space, chunk_size=chunk_size)
        cos = signs * (unit[rows] * unit[cols]).sum(-1)
        results.append(-(mult * (2.0 - 2.0 * cos)).sum())
    out = torch.stack(results)
    return out[0] if added else out


@full_precision
def soft_hyperspherical_separation(
    neurons: Tensor,
    *,
    temperature: float = 0.1,
    half_space: bool = False,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Smooth MHS penalty :math:`\tau\log\frac1P\sum_{i<j}e^{-d^2_{ij}/\tau}` (to be minimised).

    It is :math:`-\operatorname{softmin}_\tau d^2` and lies between :math:`-\min d^2 - \tau\log P`
    and :math:`-\min d^2`; every pair gets gradient, weighted by its closeness.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    batched, added = as_batched(normalize_neurons(check_neurons(neurons), eps))
    out = torch.stack(
        [
            temperature * log_mean_exp_pairs(unit, 1.0 / temperature, half_space=half_space, chunk_size=chunk_size)
            for unit in batched
        ]
    )
    return out[0] if added else out
