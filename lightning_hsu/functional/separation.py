r"""Maximum hyperspherical separation (MHS, the Tammes problem): Liu et al., *Learning with
Hyperspherical Uniformity*, AISTATS 2021 (arXiv:2103.01649).

Hard (official): \(R = -\min_{i<j} d^2_{ij}\), with every pair tied at the minimum summed, so
that the gradient flows only through the closest pair(s). Smooth: a soft-min with temperature
\(\tau\), \(R_\tau = \tau \log \frac1P\sum_{i<j} e^{-d^2_{ij}/\tau}\), which tends to the
hard value as \(\tau\to 0\).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_hsu.functional._common import (
    DEFAULT_EPS,
    as_batched,
    check_finite_neurons,
    check_neurons,
    full_precision,
    row_normalization,
)
from lightning_hsu.functional._matmul import gram, passes_on_one_thread, serial_passes
from lightning_hsu.functional.kernels import ClosestPairsKernel
from lightning_hsu.functional.pairwise import (
    _cpu_kernel,
    block_rows_for,
    cosine_blocks,
    largest_pair_cosine,
    normalized_pairwise_kernel_sum,
)
from lightning_hsu.functional.uniformity import log_mean_exp_pairs


@torch.no_grad()
def _tied_pairs(
    blocks: Iterable[tuple[int, Tensor]], threshold: float, *, half_space: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Index pairs whose cosine is at least ``threshold``: rows, cols, signs and multiplicity.

    ``blocks``: the Gram matrix of one matrix's unit rows, ``(start, [1, rows, n])`` as for
    `largest_pair_cosine`. In half-space, a tie of \(c_{ij}\) stands twice in the
    \(2n\times 2n\) matrix (\((i,j)\) and \((-i,-j)\)), a tie of \(-c_{ij}\) twice
    (\((i,-j)\), \((j,-i)\)) and the antipodal pair \((i,-i)\), of cosine \(-c_{ii}\) (the
    diagonal), once: the official code sums all.
    """
    found: list[tuple[Tensor, Tensor, float, float]] = []
    for start, block in blocks:
        cos = block[0]
        upper = torch.ones_like(cos, dtype=torch.bool).triu(start + 1)
        signs = (1.0, -1.0) if half_space else (1.0,)
        for sign in signs:
            hit = ((sign * cos) >= threshold) & upper
            i, j = hit.nonzero(as_tuple=True)
            found.append((i + start, j, sign, 2.0 if half_space else 1.0))
        if half_space:
            (i,) = (-torch.diagonal(cos, offset=start) >= threshold).nonzero(as_tuple=True)
            found.append((i + start, i + start, -1.0, 1.0))
    dtype = block.dtype
    rows = torch.cat([f[0] for f in found])
    cols = torch.cat([f[1] for f in found])
    signs_t = torch.cat([torch.full_like(f[0], 0, dtype=dtype) + f[2] for f in found])
    mult = torch.cat([torch.full_like(f[0], 0, dtype=dtype) + f[3] for f in found])
    return rows, cols, signs_t, mult


def _closest_pairs_sum(
    rows: Tensor, r: Tensor, *, half_space: bool, chunk_size: int | None, tie_rtol: float, with_grad: bool
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    r"""\(-\sum d^2\) over the tied closest pairs of the unit rows \(\hat w = r w\) (``rows`` =
    \(w\), ``r`` = \(r\), ``[n, 1]``), and its gradient with respect to \(w\) as the rows it
    adds to: ``(index, contributions)``, \(\partial R/\partial w\) being the sum of the
    contributions at their indices.

    With \(R = -\sum_t m_t (2 - 2 s_t\,\hat w_{i_t}\cdot\hat w_{j_t})\) (multiplicity
    \(m\), sign \(s\)), \(\partial R/\partial\hat w_{i_t} = 2 m_t s_t \hat w_{j_t}\) and
    symmetrically. The chain through the normalisation, \(r_i (g - (g\cdot\hat w_i)\hat w_i)\),
    is linear in \(g\), so it is applied to each pair's contribution, with
    \(\hat w_j\cdot\hat w_i\) already at hand. In one block the unit rows are never formed:
    the Gram matrix of \(w\) scaled by \(r_i r_j\) (a pass over \(n^2\) entries instead of
    \(n d\)) serves both the search for the maximum and for the ties; on the CPU with the
    compiled kernel (`_cpu_pairs`) each of the two searches is one pass over its upper triangle.
    """
    n = rows.shape[0]
    unit: Tensor | None = None
    gram_blocks: list[tuple[int, Tensor]] | None = None
    search = None
    if block_rows_for(n, chunk_size) >= n:
        search = _cpu_kernel(rows) if rows.dtype == torch.float32 and n >= 2 else None
        # the compiled search reads the upper triangle only: the Gram matrix's strips need no mirror
        products = gram(rows.unsqueeze(0), mirror=search is None)
        if search is None:
            products.mul_(r).mul_(r.mT)
        gram_blocks = [(0, products)]
    else:
        unit = (rows * r).unsqueeze(0)

    def blocks() -> Iterable[tuple[int, Tensor]]:
        return gram_blocks if gram_blocks is not None else cosine_blocks(unit, chunk_size)  # type: ignore[arg-type]

    if search is not None:  # the compiled kernel: one pass to scale and search, one for the ties
        cosines = products[0]
        c_max = search.scale_and_largest_cosine(cosines, r, half_space=half_space)
    else:
        c_max = float(largest_pair_cosine(blocks(), half_space=half_space)[0])
    min_sq = 2.0 - 2.0 * c_max
    threshold = c_max - 0.5 * (tie_rtol * abs(min_sq) + 1e-12)
    if search is not None:
        i, j, signs, mult = search.tied_pairs(cosines, threshold, half_space=half_space)
    else:
        i, j, signs, mult = _tied_pairs(blocks(), threshold, half_space=half_space)
    first, second = rows[i] * r[i], rows[j] * r[j]
    dot = (first * second).sum(-1)
    value = -(mult * (2.0 - 2.0 * signs * dot)).sum()
    if not with_grad:
        return value, None
    weight = (2.0 * mult * signs).unsqueeze(-1)
    dot = dot.unsqueeze(-1)
    contributions = torch.cat([weight * r[i] * (second - dot * first), weight * r[j] * (first - dot * second)])
    return value, (torch.cat([i, j]), contributions)


class _HardSeparation(torch.autograd.Function):
    r"""Hard MHS of raw neurons ``[n, d]``, normalised inside, gradient in closed form.

    The gradient lives on the rows of the tied pairs only, and so does its chain through
    \(\hat w = r w\) (`_closest_pairs_sum`; the same formula as
    `_NormalizedPairwiseKernelSum`): no autograd graph of the normalisation, and the only
    ``[n, d]`` tensor of a step is the gradient itself, written in backward (the unit rows, a
    gradient kept from forward and its scaled copy would each be one more: on a busy core the
    heap's page faults for them cost more than their passes, ``docs/performance.md`` item 42).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        neurons: Tensor,
        eps: float,
        half_space: bool,
        chunk_size: int | None,
        tie_rtol: float,
    ) -> Tensor:
        with_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        rows, r, _, divisor = row_normalization(neurons, eps)
        value, gradient = _closest_pairs_sum(
            rows, r, half_space=half_space, chunk_size=chunk_size, tie_rtol=tie_rtol, with_grad=with_grad
        )
        if gradient is not None:
            index, contributions = gradient
            if divisor is not None:  # rows = w / s for rescaled rows: a further 1 / s
                contributions.div_(divisor[index])
            ctx.save_for_backward(index, contributions)
            ctx.neurons_shape = neurons.shape  # type: ignore[attr-defined]
        return value

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_value: Tensor
    ) -> tuple[Tensor | None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None, None, None, None
        index, contributions = ctx.saved_tensors  # type: ignore[attr-defined]
        with passes_on_one_thread(grad_value.device):
            grad = contributions.new_zeros(ctx.neurons_shape)  # type: ignore[attr-defined]
            grad.index_add_(0, index, contributions * grad_value)
        return grad, None, None, None, None


@full_precision
@serial_passes
def hyperspherical_separation(
    neurons: Tensor,
    *,
    half_space: bool = False,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
    tie_rtol: float = 1e-5,
    check_finite: bool = True,
) -> Tensor:
    r"""Hard MHS penalty \(-\sum_{\text{closest pairs}} d^2_{ij}\) (to be minimised).

    Pairs count as tied when their \(d^2\) is within a relative ``tie_rtol`` of the minimum
    (the official code uses exact float equality, which rounding makes arbitrary: a regular
    tetrahedron computed in float32 then ties all 6 pairs, as it should, giving
    \(-6\cdot 8/3\)). Returns 0 for fewer than two neurons.

    ``check_finite=False`` makes no host sync (CUDA-graph safe; NaN/inf neurons give NaN): the
    tie threshold stays on the device and the closest pairs are summed as a pair kernel
    (`ClosestPairsKernel`), the same value and gradient
    at the cost of a second Gram product and a dense gradient product.

    Examples:
        >>> import torch
        >>> tri = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])  # 120 degrees apart
        >>> from lightning_hsu.functional import hyperspherical_separation
        >>> round(float(hyperspherical_separation(tri)), 3)  # the 3 pairs tie at d^2 = 3 (official: their sum)
        -9.0
    """
    x = check_neurons(neurons, check_finite=False)  # checked when normalised
    batched, added = as_batched(x)
    if batched.shape[1] < 2:
        if check_finite:
            check_finite_neurons(batched)
        out = (batched * 0.0).sum((1, 2))  # NaN exactly for a NaN or inf neuron
    elif check_finite:
        # one matrix directly: iterating the batch would stack its gradient into one more [n, d] copy
        matrices = [x] if added else list(batched)
        out = torch.stack(
            [_HardSeparation.apply(matrix, float(eps), half_space, chunk_size, float(tie_rtol)) for matrix in matrices]
        )
    else:  # the whole batch at once: one call's kernels, whatever the batch (CUDA graphs of many layers)
        out = _closest_pairs_sum_on_device(batched, eps, half_space, chunk_size, tie_rtol)
    return out[0] if added else out


def _closest_pairs_sum_on_device(
    neurons: Tensor, eps: float, half_space: bool, chunk_size: int | None, tie_rtol: float
) -> Tensor:
    """Hard MHS of raw ``[batch, n, d]`` neurons (``[batch]`` values) without host decisions (see
    `hyperspherical_separation`); each batch element has its own tie threshold."""
    with torch.no_grad():
        rows, r, _, _ = row_normalization(neurons, eps, check_finite=False)
        c_max = largest_pair_cosine(cosine_blocks(rows * r, chunk_size), half_space=half_space)
        # the tolerance of _closest_pairs_sum, as a device tensor
        threshold = c_max - 0.5 * (tie_rtol * (2.0 - 2.0 * c_max).abs() + 1e-12)
    kernel = ClosestPairsKernel(threshold)
    return normalized_pairwise_kernel_sum(
        neurons, kernel, eps=eps, half_space=half_space, chunk_size=chunk_size, check_finite=False
    )


@full_precision
@serial_passes
def soft_hyperspherical_separation(
    neurons: Tensor,
    *,
    temperature: float = 0.1,
    half_space: bool = False,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> Tensor:
    r"""Smooth MHS penalty \(\tau\log\frac1P\sum_{i<j}e^{-d^2_{ij}/\tau}\) (to be minimised).

    It is \(-\operatorname{softmin}_\tau d^2\) and lies between \(-\min d^2 - \tau\log P\)
    and \(-\min d^2\); every pair gets gradient, weighted by its closeness.
    ``check_finite=False``: no host sync, NaN for NaN/inf neurons (as `uniformity`).
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    x = check_neurons(neurons, check_finite=False)  # checked when normalised
    inverse = 1.0 / temperature
    return temperature * log_mean_exp_pairs(
        x, inverse, eps=eps, half_space=half_space, chunk_size=chunk_size, check_finite=check_finite
    )
