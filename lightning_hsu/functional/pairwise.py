r"""Sums over pairs of neurons, block by block, with the gradient in closed form.

For unit neurons :math:`\hat W \in \mathbb{R}^{n\times d}` and a pair kernel :math:`f` of the
cosine (:mod:`~lightning_hsu.functional.kernels`), the **full-space** sum is

.. math:: S = \sum_{i<j} f(c_{ij}), \qquad \partial S/\partial \hat w_k = \sum_{j\ne k} f'(c_{kj})\,\hat w_j.

The **half-space** sum (Liu et al., NeurIPS 2018) runs over the :math:`2n` vectors
:math:`\{\hat w_i\}\cup\{-\hat w_i\}` without building them: the pairs :math:`(i,j)` and
:math:`(-i,-j)` have cosine :math:`c_{ij}`, the pairs :math:`(i,-j)` and :math:`(j,-i)` have
:math:`-c_{ij}`, and :math:`(i,-i)` has :math:`-\lVert\hat w_i\rVert^2`, hence

.. math:: S_{half} = 2\sum_{i<j}\big[f(c_{ij}) + f(-c_{ij})\big] + \sum_i f(-\lVert\hat w_i\rVert^2)

over :math:`n(2n-1)` pairs, all from the :math:`n\times n` Gram matrix.

Two schedules visit the pairs; both form the gradient in the forward pass (the backward pass is
a scaling) and hold at most ``block_rows`` × ``n`` Gram entries at once, never :math:`O(n^2)`
above the dense threshold:

- **Upper strips** (the default). Row block :math:`I` is paired with the columns
  :math:`j \ge \min I` only, the strict lower triangle of its leading tile masked out, so every
  unordered pair is visited once. The Gram product and the kernel evaluations are halved
  (:math:`n^2 d` multiply-adds instead of :math:`2 n^2 d`); the gradient needs two products per
  strip, :math:`F_{IJ}\hat W_J` for the rows and :math:`F_{IJ}^\top\hat W_I` for the columns, in
  all as many multiply-adds as the dense :math:`F\hat W`. A layer with many neurons is cut into
  strips of about :data:`STRIP_ELEMENTS` entries (:func:`symmetric_block_rows`): the kernel's
  elementwise passes then run from cache, and the symmetry halves them.
- **Full rows** (used with ``shard``). Row block :math:`I` meets all :math:`n` columns, so the
  rows' gradient is complete after their own block: the sum over the rows of a shard is the
  partial value, and the gradient it returns is the full gradient restricted to those rows.

**Sharding across ranks.** With ``shard=(rank, world_size)`` a rank handles the rows
:func:`shard_rows` gives it (equal row counts, hence equal pair work in the full-row schedule) and
returns the partial sum :math:`S_r` with the gradient :math:`\partial S/\partial\hat W` on its own
rows and zero elsewhere, so :math:`\sum_r S_r = S` and :math:`\sum_r \nabla_r = \nabla S`
exactly. Data-parallel strategies (DDP, FSDP) *average* gradients over ranks: multiply each
rank's shard by :func:`sharded_scale` (``world_size``) before adding it to the loss, and the
average of the scaled shards is the full gradient. The scaled value is then :math:`W S_r`, not
:math:`S`: log an all-reduced sum of the unscaled shards if the value is wanted.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_hsu.functional._common import normalized_rows
from lightning_hsu.functional.kernels import PairKernel

#: Largest number of Gram entries (per batch element) held at once by the automatic choice of
#: block size: a layer with n <= 4096 is done in one dense block.
DENSE_BLOCK_ELEMENTS = 4096 * 4096
#: Gram entries per strip in the automatic choice of the upper-strip schedule (1 MiB of float32):
#: small enough for the kernel's elementwise passes to run from cache, which is what limits a
#: layer with small ``d``; a layer whose strip would be larger is cut into strips. Measured in
#: ``benchmarks/bench_kernels.py``: 2048 x 64 runs ~5x faster in strips of 128 rows than dense,
#: while 512 x 4608 (matrix-multiply bound) stays dense.
STRIP_ELEMENTS = 2**18
#: Strips are never thinner than this: thinner products lose matrix-multiply speed.
MIN_STRIP_ROWS = 128


def block_rows_for(n: int, chunk_size: int | None) -> int:
    """Rows per block: ``chunk_size`` if given, else dense up to 4096 neurons, then chunked."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        return min(chunk_size, max(n, 1))
    return max(1, min(n, DENSE_BLOCK_ELEMENTS // max(n, 1)))


def symmetric_block_rows(n: int, chunk_size: int | None) -> int:
    """Rows per strip of the upper-strip schedule.

    ``chunk_size`` if given; otherwise about :data:`STRIP_ELEMENTS` Gram entries per strip, at
    least :data:`MIN_STRIP_ROWS` rows, and never more than :func:`block_rows_for` allows.
    """
    rows = block_rows_for(n, chunk_size)
    if chunk_size is not None:
        return rows
    return max(1, min(rows, max(STRIP_ELEMENTS // max(n, 1), MIN_STRIP_ROWS)))


def pair_count(n: int, half_space: bool) -> int:
    """Number of unordered pairs: :math:`n(n-1)/2`, or :math:`n(2n-1)` in half-space."""
    return n * (2 * n - 1) if half_space else n * (n - 1) // 2


def check_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    """Validate ``shard = (rank, world_size)`` (``None`` passes through)."""
    if shard is None:
        return None
    ok = isinstance(shard, (tuple, list)) and len(shard) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
    if not ok or not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
    return int(shard[0]), int(shard[1])


def shard_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` among ``world_size``: counts differ by at most one.

    In the full-row schedule every row costs the same (one row of the Gram matrix, one row of the
    gradient product), so equal row counts are equal shares of the pair work.
    """
    return n * rank // world_size, n * (rank + 1) // world_size


def sharded_scale(world_size: int) -> float:
    """Factor for a rank's shard when the strategy averages gradients over ranks (DDP, FSDP).

    ``loss = task_loss + sharded_scale(W) * lam * energy(..., shard=(rank, W))``: the all-reduce
    divides the sum of the ranks' gradients by ``W``; the shards sum to the full gradient, so
    ``W`` times each shard averages to it.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    return float(world_size)


def _zero_self_pairs(block: Tensor, start: int) -> Tensor:
    """View of the entries (i, i) of a ``[batch, rows, n]`` block whose rows start at ``start``."""
    rows = block.shape[1]
    return torch.diagonal(block[:, :, start : start + rows], dim1=1, dim2=2)


def _row_block_sum(
    unit: Tensor,
    kernel: PairKernel,
    half_space: bool,
    block_rows: int,
    with_grad: bool,
    row_range: tuple[int, int],
    sq_norm: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Full-row schedule over rows ``row_range``: partial value, full gradient on those rows.

    ``sq_norm``: the squared norms of the rows of ``unit`` if known (half-space self pairs).
    """
    batch = unit.shape[0]
    total = unit.new_zeros(batch)
    grad = torch.zeros_like(unit) if with_grad else None
    transposed = unit.transpose(1, 2)
    first, last = row_range
    for start in range(first, last, block_rows):
        stop = min(start + block_rows, last)
        rows = unit[:, start:stop]
        cos = torch.bmm(rows, transposed)  # [batch, rows, n]
        _zero_self_pairs(cos, start).zero_()  # kernel evaluated at c = 0 there, then dropped
        value, deriv = kernel(cos, with_grad)
        _zero_self_pairs(value, start).zero_()
        if half_space:
            value_neg, deriv_neg = kernel(-cos, with_grad)
            _zero_self_pairs(value_neg, start).zero_()
            sq = (rows * rows).sum(-1) if sq_norm is None else sq_norm[:, start:stop]
            anti, anti_deriv = kernel(-sq, with_grad)
            # each ordered pair (i, j) of the block stands for the pairs (i, j), (-i, -j) [c] and
            # (i, -j), (j, -i) [-c]: summing over ordered pairs counts each unordered pair twice
            total += value.sum((1, 2)) + value_neg.sum((1, 2)) + anti.sum(1)
            if grad is not None:
                assert deriv is not None and deriv_neg is not None and anti_deriv is not None
                coeff = deriv.sub_(deriv_neg)
                _zero_self_pairs(coeff, start).zero_()
                out = grad[:, start:stop]
                out.baddbmm_(coeff, unit, beta=0.0, alpha=2.0)
                out.addcmul_(anti_deriv.unsqueeze(-1), rows, value=-2.0)
        else:
            total += 0.5 * value.sum((1, 2))
            if grad is not None:
                assert deriv is not None
                _zero_self_pairs(deriv, start).zero_()
                grad[:, start:stop].baddbmm_(deriv, unit, beta=0.0)
    return total, grad


def _upper_strip_sum(
    unit: Tensor,
    kernel: PairKernel,
    half_space: bool,
    block_rows: int,
    with_grad: bool,
    sq_norm: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Upper-strip schedule: each unordered pair once, gradient to both of its neurons.

    Strip ``[start, stop)`` meets the columns ``[start, n)``. Its leading square tile (the pairs
    within the strip) is kept whole, as in the full-row schedule: no triangular masking, which
    costs a strided pass, only the diagonal is dropped and the tile's sum is halved; the columns
    past the tile get their gradient from the transposed product. The first strip writes every
    row of the gradient (``beta=0``), so it starts uninitialised. ``sq_norm`` as in
    :func:`_row_block_sum`.
    """
    batch, n, _ = unit.shape
    total = unit.new_zeros(batch)
    grad = torch.empty_like(unit) if with_grad else None
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        beta = 0.0 if start == 0 else 1.0
        width = stop - start
        rows = unit[:, start:stop]
        cols = unit[:, start:]
        cos = torch.bmm(rows, cols.transpose(1, 2))  # [batch, rows, n - start]; column 0 is row `start`
        _zero_self_pairs(cos, 0).zero_()  # kernel evaluated at c = 0 there, then dropped
        value, deriv = kernel(cos, with_grad)
        _zero_self_pairs(value, 0).zero_()
        if half_space:
            value_neg, deriv_neg = kernel(-cos, with_grad)
            _zero_self_pairs(value_neg, 0).zero_()
            sq = (rows * rows).sum(-1) if sq_norm is None else sq_norm[:, start:stop]
            anti, anti_deriv = kernel(-sq, with_grad)
            # a pair past the tile stands once for (i, j), (-i, -j) [c] and (i, -j), (j, -i) [-c];
            # a pair in the tile is there twice, as (i, j) and (j, i)
            strip = value.sum((1, 2)) + value_neg.sum((1, 2))
            tile = value[:, :, :width].sum((1, 2)) + value_neg[:, :, :width].sum((1, 2))
            total += 2.0 * strip - tile + anti.sum(1)
            if grad is not None:
                assert deriv is not None and deriv_neg is not None and anti_deriv is not None
                coeff = deriv.sub_(deriv_neg)  # d/dc [f(c) + f(-c)]
                _zero_self_pairs(coeff, 0).zero_()
                grad[:, start:stop].baddbmm_(coeff, cols, beta=beta, alpha=2.0)
                grad[:, start:stop].addcmul_(anti_deriv.unsqueeze(-1), rows, value=-2.0)
                if stop < n:
                    grad[:, stop:].baddbmm_(coeff[:, :, width:].transpose(1, 2), rows, beta=beta, alpha=2.0)
        else:
            total += value.sum((1, 2)) - 0.5 * value[:, :, :width].sum((1, 2))
            if grad is not None:
                assert deriv is not None
                _zero_self_pairs(deriv, 0).zero_()
                grad[:, start:stop].baddbmm_(deriv, cols, beta=beta)
                if stop < n:
                    grad[:, stop:].baddbmm_(deriv[:, :, width:].transpose(1, 2), rows, beta=beta)
    return total, grad


def _block_sums(
    unit: Tensor,
    kernel: PairKernel,
    half_space: bool,
    block_rows: int,
    with_grad: bool,
    row_range: tuple[int, int] | None,
    sq_norm: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Value and gradient by upper strips (``row_range=None``) or by the full rows of a shard."""
    if row_range is None:
        return _upper_strip_sum(unit, kernel, half_space, block_rows, with_grad, sq_norm)
    return _row_block_sum(unit, kernel, half_space, block_rows, with_grad, row_range, sq_norm)


def _saved_gradient(ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor) -> Tensor | None:
    """Backward of the pair-sum Functions: the gradient formed in forward, times ``grad_total``."""
    if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
        return None
    (grad,) = ctx.saved_tensors  # type: ignore[attr-defined]
    return grad * grad_total.view(-1, 1, 1)


class _PairwiseKernelSum(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        unit: Tensor,
        kernel: PairKernel,
        half_space: bool,
        block_rows: int,
        row_range: tuple[int, int] | None,
    ) -> Tensor:
        with_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        total, grad = _block_sums(unit, kernel, half_space, block_rows, with_grad, row_range)
        if grad is not None:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor
    ) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        return _saved_gradient(ctx, grad_total), None, None, None, None


class _NormalizedPairwiseKernelSum(torch.autograd.Function):
    r""":class:`_PairwiseKernelSum` of the normalised rows of raw neurons, normalising inside.

    With :math:`\hat w = r w`, :math:`r = (\lVert w\rVert^2 + \epsilon)^{-1/2}` and
    :math:`g = \partial S/\partial\hat w` from the block sums,
    :math:`\partial\hat w/\partial w = r (I - \hat w\hat w^\top)` (using
    :math:`\partial r/\partial w = -r^3 w`), hence
    :math:`\partial S/\partial w = r\,(g - (g\cdot\hat w)\,\hat w)`: three passes over the
    gradient instead of an autograd graph of the normalisation, and no host sync but the one
    check of :func:`~lightning_hsu.functional._common.normalized_rows`. Rows rescaled there by
    :math:`s` (a constant, as in :func:`~lightning_hsu.functional._common.normalize_neurons`)
    get a further :math:`1/s`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        neurons: Tensor,
        eps: float,
        kernel: PairKernel,
        half_space: bool,
        block_rows: int,
        row_range: tuple[int, int] | None,
    ) -> Tensor:
        with_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        unit, r, sq_norm, divisor = normalized_rows(neurons, eps)
        total, grad = _block_sums(unit, kernel, half_space, block_rows, with_grad, row_range, sq_norm)
        if grad is not None:
            radial = torch.linalg.vecdot(grad, unit).unsqueeze(-1)  # g . w_hat
            grad.addcmul_(radial, unit, value=-1.0).mul_(r)
            if divisor is not None:
                grad.div_(divisor)
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor
    ) -> tuple[Tensor | None, None, None, None, None, None]:  # type: ignore[override]
        return _saved_gradient(ctx, grad_total), None, None, None, None, None


def _schedule(n: int, chunk_size: int | None, shard: tuple[int, int] | None) -> tuple[int, tuple[int, int] | None]:
    """Rows per block and the row range (``None``: upper strips over all rows)."""
    checked = check_shard(shard)
    rows = symmetric_block_rows(n, chunk_size)  # with shard: the same cache-sized blocks, of full rows
    if checked is None:
        return rows, None
    rank, world_size = checked
    return rows, shard_rows(n, rank, world_size)


def normalized_pairwise_kernel_sum(
    neurons: Tensor,
    kernel: PairKernel,
    *,
    eps: float,
    half_space: bool = False,
    chunk_size: int | None = None,
    shard: tuple[int, int] | None = None,
) -> Tensor:
    """:func:`pairwise_kernel_sum` of ``normalize_neurons(neurons, eps)``, differentiable w.r.t. ``neurons``.

    ``neurons``: ``[batch, n, d]`` raw float32/float64 neurons. The same value and gradient as the
    composition to float rounding, in fewer passes and with a single host sync (the NaN/inf check:
    raises :class:`~lightning_hsu.functional._common.NonFiniteInputError`).
    """
    block_rows, row_range = _schedule(neurons.shape[1], chunk_size, shard)
    return _NormalizedPairwiseKernelSum.apply(neurons, float(eps), kernel, half_space, block_rows, row_range)


def pairwise_kernel_sum(
    unit: Tensor,
    kernel: PairKernel,
    *,
    half_space: bool = False,
    chunk_size: int | None = None,
    shard: tuple[int, int] | None = None,
) -> Tensor:
    """Sum of ``kernel`` over all pairs of the unit neurons ``unit`` (``[batch, n, d]``).

    Returns a ``[batch]`` tensor, differentiable with respect to ``unit``. See the module
    docstring for the formula and the two schedules.

    Args:
        unit: ``[batch, n, d]`` unit (or near-unit) neurons.
        kernel: the pair kernel and its derivative.
        half_space: sum over the pairs of :math:`\\{\\pm\\hat w_i\\}`.
        chunk_size: rows per block (``None``: strips of about :data:`STRIP_ELEMENTS` Gram
            entries, i.e. dense for small layers; the same row counts with ``shard``).
        shard: ``(rank, world_size)``: compute only this rank's rows (:func:`shard_rows`); the
            ranks' values and gradients sum exactly to the unsharded ones. Under a strategy that
            averages gradients multiply the result by :func:`sharded_scale`.
    """
    block_rows, row_range = _schedule(unit.shape[1], chunk_size, shard)
    return _PairwiseKernelSum.apply(unit, kernel, half_space, block_rows, row_range)


@torch.no_grad()
def extreme_pair_cosine(unit: Tensor, *, half_space: bool, chunk_size: int | None, largest: bool) -> Tensor:
    """Largest (or smallest) cosine over all pairs, per batch element, without gradient.

    In half-space the candidates are :math:`\\pm c_{ij}` and :math:`-\\lVert\\hat w_i\\rVert^2`.
    """
    batch, n, _ = unit.shape
    rows = block_rows_for(n, chunk_size)
    fill = -torch.inf if largest else torch.inf
    best = unit.new_full((batch,), fill)
    reduce = torch.amax if largest else torch.amin
    pick = torch.maximum if largest else torch.minimum
    transposed = unit.transpose(1, 2)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        cos = torch.bmm(unit[:, start:stop], transposed)
        _zero_self_pairs(cos, start).fill_(fill)
        best = pick(best, reduce(cos, dim=(1, 2)))
        if half_space:
            _zero_self_pairs(cos, start).fill_(-fill)
            best = pick(best, reduce(-cos, dim=(1, 2)))
            sq_norm = (unit[:, start:stop] * unit[:, start:stop]).sum(-1)
            best = pick(best, reduce(-sq_norm, dim=1))
    return best
