r"""Sums over pairs of neurons, block by block, with the gradient in closed form.

For unit neurons \(\hat W \in \mathbb{R}^{n\times d}\) and a pair kernel \(f\) of the
cosine (`kernels`), the **full-space** sum is

\[
S = \sum_{i<j} f(c_{ij}), \qquad \partial S/\partial \hat w_k = \sum_{j\ne k} f'(c_{kj})\,\hat w_j.
\]

The **half-space** sum (Liu et al., NeurIPS 2018) runs over the \(2n\) vectors
\(\{\hat w_i\}\cup\{-\hat w_i\}\) without building them: the pairs \((i,j)\) and
\((-i,-j)\) have cosine \(c_{ij}\), the pairs \((i,-j)\) and \((j,-i)\) have
\(-c_{ij}\), and \((i,-i)\) has \(-\lVert\hat w_i\rVert^2\), hence

\[
S_{half} = 2\sum_{i<j}\big[f(c_{ij}) + f(-c_{ij})\big] + \sum_i f(-\lVert\hat w_i\rVert^2)
\]

over \(n(2n-1)\) pairs, all from the \(n\times n\) Gram matrix.

Three schedules visit the pairs; all form the gradient in the forward pass (the backward pass is
a scaling) and hold at most ``block_rows`` × ``n`` Gram entries at once, never \(O(n^2)\)
above the dense threshold:

- **One block** (a layer whose Gram matrix fits one strip: by default up to 512 neurons on the
  CPU with the eager passes, 2048 with the compiled kernel, 4096 on a GPU). The whole Gram
  matrix, from the raw rows with the normalisation factors applied to it; the
  normalisation's chain rule is folded into the coefficients (`_fold_projection`), so the
  gradient with respect to the raw weights is one product and nothing but the two products
  touches ``[n, d]``.
- **Upper strips** (the default). Row block \(I\) is paired with the columns
  \(j \ge \min I\) only, the strict lower triangle of its leading tile masked out, so every
  unordered pair is visited once. The Gram product and the kernel evaluations are halved
  (\(n^2 d\) multiply-adds instead of \(2 n^2 d\)); the gradient needs two products per
  strip, \(F_{IJ}\hat W_J\) for the rows and \(F_{IJ}^\top\hat W_I\) for the columns, in
  all as many multiply-adds as the dense \(F\hat W\). On the CPU a layer past one block is
  cut into about `STRIPS_PER_LAYER` strips (`symmetric_block_rows`), few enough that each
  product is large, and the kernel's elementwise passes run over cache-sized row blocks of each
  strip (`_strip_passes`); the symmetry halves them. On a GPU, bound by launches rather than
  caches, a layer is one block up to 4096 neurons.
- **Full rows** (used with ``shard``). Row block \(I\) meets all \(n\) columns, so the
  rows' gradient is complete after their own block: the sum over the rows of a shard is the
  partial value, and the gradient it returns is the full gradient restricted to those rows.

**On a GPU with Triton** every block's elementwise passes (kernel values and slopes, clamps,
half-space pairing, self pairs, the folded projection) are one fused launch
(`_triton_pairs.pair_block_sums`, switched by the environment variable `TRITON_ENV`) instead of
about 65 small ones. **On the CPU** the same is one call of a C function (`_cpu_pairs`, built
with the machine's C compiler at first use, switched by `CPU_KERNEL_ENV`), which walks each row
from cache: a layer of up to 2048 neurons is then one block, its Gram matrix in `_matmul.gram`'s
mirrored strips and its gradient one product. Float64, the angular kernel, tensors without
storage (functorch's wrappers, fake tensors) and ``torch.compile`` tracing keep the eager passes,
which are also the fallback without Triton or a compiler.

**Sharding across ranks.** With ``shard=(rank, world_size)`` a rank handles the rows
`shard_rows` gives it (equal row counts, hence equal pair work in the full-row schedule) and
returns the partial sum \(S_r\) with the gradient \(\partial S/\partial\hat W\) on its own
rows and zero elsewhere, so \(\sum_r S_r = S\) and \(\sum_r \nabla_r = \nabla S\)
exactly. Data-parallel strategies (DDP, FSDP) *average* gradients over ranks: multiply each
rank's shard by `sharded_scale` (``world_size``) before adding it to the loss, and the
average of the scaled shards is the full gradient. The scaled value is then \(W S_r\), not
\(S\): log an all-reduced sum of the unscaled shards if the value is wanted.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_hsu.functional import _fused_family, _switches
from lightning_hsu.functional._common import row_normalization
from lightning_hsu.functional._matmul import (
    PRODUCT_PRECISIONS,
    ProductPrecision,
    batched_matmul,
    gram,
    matmul_into,
    passes_on_one_thread,
    product_precision,
)
from lightning_hsu.functional.kernels import PairKernel
from lightning_hsu.validation import choice, positive_int

#: Largest number of Gram entries (per batch element) held at once by the automatic choice of
#: block size: a layer with n <= 4096 is done in one dense block.
DENSE_BLOCK_ELEMENTS = 4096 * 4096
#: On the CPU a layer whose Gram matrix has at most this many entries (n <= 512) is one block;
#: a larger one is cut into strips (`symmetric_block_rows`), its kernel passes run in blocks of
#: `KERNEL_BLOCK_ELEMENTS` (see docs/performance.md, items 4, 8 and 27).
STRIP_ELEMENTS = 2**18
#: With the compiled kernel (`_cpu_pairs`) a CPU layer whose Gram matrix has at most this many
#: entries (n <= 2048) is one block. One block against the kernel's strips, half-space MHE with
#: d = 512 on CPU B, one and two threads: 0.86 and 0.74 at n = 1024, 0.95 and 0.93 at 2048, 1.08
#: and 1.20 at 3072, 1.11 and 1.23 at 4096 (mirroring and faulting in a 36-64 MiB matrix).
FUSED_BLOCK_ELEMENTS = 2**22
#: On the CPU a batch of one-block Gram matrices (CoMHE's projections) is done a group at a time,
#: each group's matrices at most this many entries together (16 MiB of float32: below glibc's
#: largest mmap threshold, so the heap hands the next group the same pages). All 20 of CoMHE's
#: 1024 x 1024 matrices at once took 80 MiB mapped afresh per call, whose page faults cost 30% of it.
DENSE_GROUP_ELEMENTS = 2**22
#: Strips are never thinner than this: thinner products lose matrix-multiply speed.
MIN_STRIP_ROWS = 128
#: A layer past one block is cut into about this many strips on the CPU: each strip is a few
#: products, each product a barrier of the thread pool, which a busy core stretches by
#: milliseconds; eight strips compute 1/16 more than half the Gram matrix.
STRIPS_PER_LAYER = 8
#: Largest strip on the CPU, in Gram entries (16 MiB of float32 per temporary of a strip).
MAX_STRIP_ELEMENTS = 2**22
#: Gram entries whose kernel passes run together in the one-block schedule (256 KiB of float32
#: per temporary: the few a block needs stay in a core's cache, where a whole 512 x 512 matrix,
#: 1 MiB each, did not). Measured at 2 threads, forward + backward, with the closed-form
#: half-space term: the penalty of a ResNet-18's 21 layers 54.9 ms in blocks of 2**15 entries,
#: 52.4 in 2**16, 52.6 in 2**17, 56.4 in one block per layer (medians of 6 alternating rounds);
#: alone, half-space 512 x 8 took 1.09, 0.74 and 0.59 ms in blocks of 2**15, 2**16 and 2**17.
#: (Before the closed form, 2**15 was best: 512 x 8 in 64-row blocks 2.1 ms, in one 5.3 ms.)
KERNEL_BLOCK_ELEMENTS = 2**16
#: Blocks of the one-block schedule are never thinner than this (per-block fixed costs).
MIN_KERNEL_BLOCK_ROWS = 32
#: Environment variables choosing the fused kernels of a block's pair terms (`_switches.TRITON`:
#: the Triton kernel on CUDA; `_switches.CPU_KERNEL`: the compiled C kernel on the CPU).
TRITON_ENV = _switches.TRITON.name
CPU_KERNEL_ENV = _switches.CPU_KERNEL.name


def block_rows_for(n: int, chunk_size: int | None) -> int:
    """Rows per block: ``chunk_size`` if given, else dense up to 4096 neurons, then chunked."""
    if chunk_size is not None:
        return min(positive_int("pairwise_kernel_sum", "chunk_size", chunk_size), max(n, 1))
    return max(1, min(n, DENSE_BLOCK_ELEMENTS // max(n, 1)))


def symmetric_block_rows(n: int, chunk_size: int | None, device_type: str = "cpu", fused: bool = False) -> int:
    """Rows per strip of the upper-strip schedule.

    ``chunk_size`` if given; otherwise, on the CPU, one block while the Gram matrix has at most
    `STRIP_ELEMENTS` entries (`FUSED_BLOCK_ELEMENTS` with the compiled kernel, ``fused``: its
    one call per block walks the whole matrix from cache, and the gradient is one product), else
    `STRIPS_PER_LAYER` strips, at least `MIN_STRIP_ROWS` and at most `MAX_STRIP_ELEMENTS` ``/ n``
    rows, and never more than `block_rows_for` allows (the kernel's passes over a strip run in
    cache-sized blocks, `_strip_passes`). Elsewhere (a GPU) as many rows as `block_rows_for`
    allows: on a GPU each strip's dozen launches cost more than its passes (measured on an H200:
    2048 x 512 in 16 strips took 5.9x the matrix-multiply bound even replayed from a CUDA graph,
    512 x 4608 in one block 2.8x).
    """
    rows = block_rows_for(n, chunk_size)
    one_block = FUSED_BLOCK_ELEMENTS if fused else STRIP_ELEMENTS
    if chunk_size is not None or device_type != "cpu" or n * n <= one_block:
        return rows
    strip = max(MIN_STRIP_ROWS, min(-(-n // STRIPS_PER_LAYER), MAX_STRIP_ELEMENTS // n))
    return max(1, min(rows, strip))


def pair_count(n: int, half_space: bool) -> int:
    """Number of unordered pairs: \\(n(n-1)/2\\), or \\(n(2n-1)\\) in half-space."""
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
    return float(positive_int("sharded_scale", "world_size", world_size))


@functools.cache
def _triton_pairs_module() -> ModuleType | None:
    """The fused kernel's module, imported on first use (it imports Triton); ``None`` without Triton."""
    try:
        from lightning_hsu.functional import _triton_pairs
    except Exception:  # absent, or an install that fails to import: the eager passes stay correct
        return None
    return _triton_pairs


def _fused_pairs(block: Tensor, kernel: PairKernel) -> ModuleType | None:
    """The fused kernel's module if it takes this block, else ``None``: the eager passes.

    CUDA tensors take the Triton kernel (`TRITON_ENV`), CPU tensors the compiled C kernel
    (`CPU_KERNEL_ENV`, `_cpu_pairs`), or Triton's interpreter when asked (the parity tests). Not
    under ``torch.compile`` tracing (inductor fuses the eager passes itself), not for float64, not
    for kernels without a fused form (the angular one, subclasses). The first use on a CUDA device
    launches a probe (`_triton_pairs.ready`); during a CUDA graph capture an untried device keeps
    the eager path (a capture is preceded by warm-up calls, which try it). The C kernel is built
    and probed at its first use in a process (`_cpu_pairs.ready`).
    """
    if block.dtype != torch.float32 or torch.compiler.is_compiling() or not _fused_family.supports(kernel):
        return None
    triton_mode = _switches.TRITON.read()
    device = block.device
    if device.type == "cpu":
        interpreted = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"
        if not (triton_mode == "always" and interpreted):
            return _cpu_kernel(block)
    elif device.type != "cuda":
        return None
    if triton_mode == "0":
        return None
    module = _triton_pairs_module()
    if module is None:
        return None
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return module if module.ready(device, may_probe=not capturing) else None


def _cpu_kernel(block: Tensor) -> ModuleType | None:
    """`_cpu_pairs` unless ``block`` is not a CPU tensor, `CPU_KERNEL_ENV` is ``0``, ``block`` has no storage
    to hand over (functorch's wrappers, fake tensors), or the kernel did not build (imported on first use)."""
    from lightning_hsu.functional import _cpu_pairs

    return _cpu_pairs if _cpu_pairs.takes(block) else None


def _self_pairs(block: Tensor, start: int) -> Tensor:
    """View of the entries (i, i) of a ``[batch, rows, m]`` block whose rows are columns ``start`` on."""
    rows = block.shape[1]
    return torch.diagonal(block[:, :, start : start + rows], dim1=1, dim2=2)


def _kernel_block(
    cos: Tensor,
    diag: int,
    kernel: PairKernel,
    half_space: bool,
    sq: Tensor,
    with_grad: bool,
    host_sync: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""Pair terms of a block of cosines and their gradient coefficients.

    ``cos``: ``[batch, rows, m]``, the self pairs of the rows on the diagonal from column ``diag``
    (zeroed here); ``sq``: ``[batch, rows]`` squared norms of the rows. Returns

    - ``pair``: the term of each ordered pair, \(f(c) + f(-c)\) in half space and \(f(c)\)
      in full space, zero on the self pairs;
    - ``anti``: ``[batch]`` sum over the rows of \(f(-\lVert\hat w_i\rVert^2)\) (half space;
      zero in full space);
    - ``coeff``: the matrix \(C\) with \(\partial S/\partial\hat w_i = \sum_j C_{ij}\hat w_j\)
      over the block: \(2(f'(c) - f'(-c))\) and, on the diagonal, the antipodal pair's
      \(-2 f'(-\lVert\hat w_i\rVert^2)\) in half space; \(f'(c)\) and a zero diagonal in
      full space. Folding the self term into the diagonal saves a pass over the ``[rows, d]``
      gradient.

    ``host_sync``: the kernel may check the data on the host for a faster formula
    (`antipodal_sum`).
    """
    _self_pairs(cos, diag).zero_()  # the kernel is evaluated at c = 0 there, then dropped
    if half_space:
        pair, coeff = kernel.antipodal_sum(cos, with_grad, derivative_scale=2.0, host_sync=host_sync)
        anti_value, anti_deriv = kernel(-sq, with_grad)
        anti = anti_value.sum(1)
        if coeff is not None:
            assert anti_deriv is not None
            torch.mul(anti_deriv, -2.0, out=_self_pairs(coeff, diag))
    else:
        pair, coeff = kernel(cos, with_grad)
        anti = cos.new_zeros(cos.shape[0])
        if coeff is not None:
            _self_pairs(coeff, diag).zero_()
    _self_pairs(pair, diag).zero_()
    return pair, anti, coeff


def _fold_projection(
    coeff: Tensor, cos: Tensor, diag: int, sq: Tensor, row_scale: Tensor, out: Tensor | None = None
) -> Tensor:
    r"""Turn complete coefficient rows into those of the gradient with respect to the raw neurons.

    With \(\hat w = r w\) and \(g_i = \sum_j C_{ij}\hat w_j\),
    \(\partial S/\partial w_i = r_i\,(g_i - (g_i\cdot\hat w_i)\,\hat w_i)\) and
    \(g_i\cdot\hat w_i = \sum_j C_{ij} c_{ij} =: \rho_i\) (\(c_{ii} = \lVert\hat w_i\rVert^2\)),
    so the rows \(C'_{ij} = r_i\,(C_{ij} - \delta_{ij}\rho_i)\) give it in the one product
    \(C'\hat W\): the projection costs passes over the ``[rows, m]`` block, not over the
    ``[rows, d]`` gradient. Valid only when the block holds every column of its rows (``cos``'s
    diagonal already zeroed by `_kernel_block`). The rows \(C'\) are written to ``out``
    if given (which may be ``cos``, no longer needed), else over ``coeff``.
    """
    self_coeff = _self_pairs(coeff, diag)
    radial = torch.linalg.vecdot(coeff, cos).addcmul_(self_coeff, sq)
    self_coeff.sub_(radial)
    return coeff.mul_(row_scale) if out is None else torch.mul(coeff, row_scale, out=out)


class GradientProduct(NamedTuple):
    """A gradient left as the product ``coefficients @ rows`` (``[batch, n, n]`` by ``[batch, n, d]``),
    formed in backward: see `_save_gradient`."""

    coefficients: Tensor
    rows: Tensor


def _row_block_sum(
    unit: Tensor,
    kernel: PairKernel,
    half_space: bool,
    block_rows: int,
    with_grad: bool,
    row_range: tuple[int, int],
    sq_norm: Tensor,
    row_scale: Tensor | None,
    host_sync: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Full-row schedule over rows ``row_range``: partial value, full gradient on those rows.

    Every block holds whole rows, so with ``row_scale`` the projection is folded into each block.
    As in the strips, the kernel's passes run on row blocks of about `KERNEL_BLOCK_ELEMENTS`
    entries on the CPU, each block's coefficients written over its cosines.
    """
    batch, n, _ = unit.shape
    total = unit.new_zeros(batch)
    grad = torch.zeros_like(unit) if with_grad else None
    transposed = unit.transpose(1, 2)
    first, last = row_range
    step = max(MIN_KERNEL_BLOCK_ROWS, KERNEL_BLOCK_ELEMENTS // max(n, 1)) if unit.device.type == "cpu" else block_rows
    for start in range(first, last, block_rows):
        stop = min(start + block_rows, last)
        cos = batched_matmul(unit[:, start:stop], transposed)  # [batch, rows, n]
        for low in range(start, stop, step):
            high = min(low + step, stop)
            block = cos[:, low - start : high - start]
            sq = sq_norm[:, low:high]
            fused = _fused_pairs(block, kernel)
            if fused is not None:  # values, coefficients and the folded projection in one launch
                scale = None if row_scale is None else row_scale[:, low:high, 0]
                pair_sum, _, anti = fused.pair_block_sums(
                    block, low, kernel, half_space=half_space, sq=sq, with_grad=with_grad, row_scale=scale
                )
                total += (pair_sum if half_space else 0.5 * pair_sum) + anti
                continue
            pair, anti, coeff = _kernel_block(block, low, kernel, half_space, sq, with_grad, host_sync)
            # summing over ordered pairs counts each unordered pair twice: exactly the half-space
            # weight (pairs (i, j), (-i, -j) [c] and (i, -j), (j, -i) [-c]), twice the full-space one
            total += (pair.sum((1, 2)) if half_space else 0.5 * pair.sum((1, 2))) + anti
            if coeff is None:
                continue
            if row_scale is not None:  # written over the block's cosines: no copy
                _fold_projection(coeff, block, low, sq, row_scale[:, low:high], out=block)
            else:
                block.copy_(coeff)
        if grad is not None:
            matmul_into(grad[:, start:stop], cos, unit)
    return total, grad


def _dense_passes(
    cos: Tensor,
    kernel: PairKernel,
    half_space: bool,
    with_grad: bool,
    sq_norm: Tensor,
    row_scale: Tensor | None,
    host_sync: bool,
) -> Tensor:
    """The eager kernel passes of `_dense_sum` over its Gram matrix ``cos`` (raw products with
    ``row_scale``), in row blocks on the CPU; returns the sum, writes the coefficients over ``cos``."""
    n = cos.shape[1]
    total = cos.new_zeros(cos.shape[0])
    col_scale = None if row_scale is None else row_scale.transpose(1, 2)
    block_rows = max(MIN_KERNEL_BLOCK_ROWS, KERNEL_BLOCK_ELEMENTS // max(n, 1))
    if cos.device.type != "cpu":
        block_rows = n  # a GPU is bound by kernel launches, not by cache: one block
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        block = cos[:, start:stop]
        sq = sq_norm[:, start:stop]
        if row_scale is not None and col_scale is not None:
            block.mul_(row_scale[:, start:stop]).mul_(col_scale)
        pair, anti, coeff = _kernel_block(block, start, kernel, half_space, sq, with_grad, host_sync)
        total += (pair.sum((1, 2)) if half_space else 0.5 * pair.sum((1, 2))) + anti
        if coeff is None:
            continue
        if row_scale is not None and col_scale is not None:  # written over the block's cosines: no copy
            _fold_projection(coeff, block, start, sq, row_scale[:, start:stop], out=block).mul_(col_scale)
        else:
            block.copy_(coeff)
    return total


def _dense_sum(
    rows: Tensor,
    kernel: PairKernel,
    half_space: bool,
    with_grad: bool,
    sq_norm: Tensor,
    row_scale: Tensor | None,
    host_sync: bool = False,
) -> tuple[Tensor, Tensor | GradientProduct | None]:
    r"""All pairs from one Gram matrix, for a layer whose whole Gram matrix fits one strip.

    ``rows``: the unit neurons, or with ``row_scale`` = \(r\) the rows \(w\) of
    \(\hat w = r w\), never formed: the Gram matrix is \(r_i r_j (w_i\cdot w_j)\), the
    projection is folded into the coefficients (`_fold_projection`) and the columns' factor
    \(r_j\) too, so the one product \(C'' W\) is the gradient with respect to \(w\).
    Every pass but the two products is over the ``[n, n]`` matrix, none over ``[n, d]``; on the
    CPU those passes run on about `KERNEL_BLOCK_ELEMENTS` entries at a time, from cache,
    and each block's coefficients overwrite its rows of the Gram matrix (a row's cosines are
    needed by that row only), so \(C''\) costs no further ``[n, n]`` buffer. With the fused
    kernel (`_fused_pairs`) those passes are one launch over the whole matrix.
    """
    batch, n, d = rows.shape
    group = max(1, DENSE_GROUP_ELEMENTS // (n * n))
    if rows.device.type == "cpu" and n > d and group < batch:  # gradients formed here, [group, n, d] each
        parts = [
            _dense_sum(
                rows[i : i + group],
                kernel,
                half_space,
                with_grad,
                sq_norm[i : i + group],
                None if row_scale is None else row_scale[i : i + group],
                host_sync,
            )
            for i in range(0, batch, group)
        ]
        total = torch.cat([part_total for part_total, _ in parts])
        if not with_grad:
            return total, None
        return total, torch.cat([grad for _, grad in parts])  # type: ignore[misc]
    cos = gram(rows)
    fused = _fused_pairs(cos, kernel)
    if fused is not None:  # the whole matrix in one launch, the factors r_i r_j applied inside
        scale = None if row_scale is None else row_scale[..., 0]
        pair_sum, _, anti = fused.pair_block_sums(
            cos, 0, kernel, half_space=half_space, sq=sq_norm, with_grad=with_grad, row_scale=scale, col_scale=scale
        )
        total = (pair_sum if half_space else 0.5 * pair_sum) + anti
    else:
        total = _dense_passes(cos, kernel, half_space, with_grad, sq_norm, row_scale, host_sync)
    if not with_grad:
        return total, None
    if n <= rows.shape[2]:  # the [n, n] coefficients are no larger than the [n, d] gradient
        return total, GradientProduct(cos, rows)
    return total, batched_matmul(cos, rows)


def _strip_passes(
    cos: Tensor,
    width: int,
    kernel: PairKernel,
    half_space: bool,
    sq: Tensor,
    with_grad: bool,
    host_sync: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The kernel over a strip whose self pairs lie on the diagonal from column 0.

    Returns the sum of its pair terms, that of its leading ``width`` columns (the tile), the
    antipodal sum and the coefficients. On the CPU the passes run on row blocks of about
    `KERNEL_BLOCK_ELEMENTS` entries, from cache, and the coefficients are written over
    ``cos`` (which is returned as them); elsewhere the strip is one block.
    """
    batch, rows, m = cos.shape
    fused = _fused_pairs(cos, kernel)
    if fused is not None:  # one launch for the strip, coefficients written over its cosines
        pair, tile, anti = fused.pair_block_sums(
            cos, 0, kernel, half_space=half_space, sq=sq, with_grad=with_grad, width=width
        )
        return pair, tile, anti, cos if with_grad else None
    step = max(MIN_KERNEL_BLOCK_ROWS, KERNEL_BLOCK_ELEMENTS // max(m, 1)) if cos.device.type == "cpu" else rows
    if step >= rows:
        pair, anti, coeff = _kernel_block(cos, 0, kernel, half_space, sq, with_grad, host_sync)
        return pair.sum((1, 2)), pair[:, :, :width].sum((1, 2)), anti, coeff
    pair_total = cos.new_zeros(batch)
    tile_total = cos.new_zeros(batch)
    anti_total = cos.new_zeros(batch)
    for first in range(0, rows, step):
        last = min(first + step, rows)
        block = cos[:, first:last]
        pair, anti, coeff = _kernel_block(block, first, kernel, half_space, sq[:, first:last], with_grad, host_sync)
        pair_total += pair.sum((1, 2))
        tile_total += pair[:, :, :width].sum((1, 2))
        anti_total += anti
        if coeff is not None:  # a row's cosines are needed by that row only
            block.copy_(coeff)
    return pair_total, tile_total, anti_total, cos if with_grad else None


def _upper_strip_sum(
    unit: Tensor,
    kernel: PairKernel,
    half_space: bool,
    block_rows: int,
    with_grad: bool,
    sq_norm: Tensor,
    row_scale: Tensor | None,
    host_sync: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Upper-strip schedule: each unordered pair once, gradient to both of its neurons.

    Strip ``[start, stop)`` meets the columns ``[start, n)``. Its leading square tile (the pairs
    within the strip) is kept whole, as in the full-row schedule: no triangular masking, which
    costs a strided pass, only the diagonal is dropped and the tile's sum is halved; the columns
    past the tile get their gradient from the transposed product. A row's coefficients are spread
    over strips, so the projection (``row_scale``) runs on the gradient afterwards.
    """
    batch, n, _ = unit.shape
    total = unit.new_zeros(batch)
    grad = torch.empty_like(unit) if with_grad else None
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        accumulate = start > 0  # the first strip writes every row of the gradient
        width = stop - start
        rows = unit[:, start:stop]
        cols = unit[:, start:]
        cos = batched_matmul(rows, cols.transpose(1, 2))  # [batch, rows, n - start]; column 0 is row `start`
        sq = sq_norm[:, start:stop]
        pair_total, tile_total, anti, coeff = _strip_passes(cos, width, kernel, half_space, sq, with_grad, host_sync)
        # a pair past the tile stands once for its unordered pair; a pair in the tile is there
        # twice, as (i, j) and (j, i): the full-row weights of _row_block_sum, re-weighted
        if half_space:
            total += 2.0 * pair_total - tile_total + anti
        else:
            total += pair_total - 0.5 * tile_total
        if grad is not None:
            assert coeff is not None
            matmul_into(grad[:, start:stop], coeff, cols, accumulate=accumulate)
            if stop < n:
                matmul_into(grad[:, stop:], coeff[:, :, width:].transpose(1, 2), rows, accumulate=accumulate)
    if grad is not None and row_scale is not None:
        radial = torch.linalg.vecdot(grad, unit).unsqueeze(-1)  # g . w_hat
        grad.addcmul_(radial, unit, value=-1.0).mul_(row_scale)
    return total, grad


def _block_sums(
    unit: Tensor,
    kernel: PairKernel,
    half_space: bool,
    block_rows: int,
    with_grad: bool,
    row_range: tuple[int, int] | None,
    sq_norm: Tensor | None = None,
    row_scale: Tensor | None = None,
    host_sync: bool = False,
) -> tuple[Tensor, Tensor | GradientProduct | None]:
    """Value and gradient: in one block, by upper strips (``row_range=None``), or by the full rows of a shard.

    ``unit``: the unit neurons, or with ``row_scale`` the rows \\(w\\) of \\(\\hat w = r w\\)
    (``row_scale`` = \\(r\\), ``[batch, n, 1]``); the gradient is then with respect to
    \\(w\\) (`_fold_projection`), else to ``unit``. ``sq_norm``: the squared norms of the
    unit neurons (computed if ``None``; required with ``row_scale``). ``host_sync``: the
    kernel may check the data on the host for a faster formula (`_kernel_block`).
    """
    if sq_norm is None:
        sq_norm = torch.linalg.vector_norm(unit, dim=-1).square_()
    if row_range is None and block_rows >= unit.shape[1]:
        return _dense_sum(unit, kernel, half_space, with_grad, sq_norm, row_scale, host_sync)
    if unit.shape[0] > 1 and unit.device.type == "cpu":
        # strips are sized for the cache per batch element; a batch of them (CoMHE's K
        # projections) would be K times that: one element at a time (2-2.6x faster for
        # 20 x [1024 or 2048, 40] on this CPU)
        parts = [
            _block_sums(
                unit[i : i + 1],
                kernel,
                half_space,
                block_rows,
                with_grad,
                row_range,
                sq_norm[i : i + 1],
                None if row_scale is None else row_scale[i : i + 1],
                host_sync,
            )
            for i in range(unit.shape[0])
        ]
        totals = torch.cat([total for total, _ in parts])
        if not with_grad:
            return totals, None
        return totals, torch.cat([grad for _, grad in parts])  # type: ignore[misc]
    if row_scale is not None:
        unit = unit * row_scale
    if row_range is None:
        return _upper_strip_sum(unit, kernel, half_space, block_rows, with_grad, sq_norm, row_scale, host_sync)
    return _row_block_sum(unit, kernel, half_space, block_rows, with_grad, row_range, sq_norm, row_scale, host_sync)


def _save_gradient(
    ctx: torch.autograd.function.FunctionCtx,
    grad: Tensor | GradientProduct | None,
    divisor: Tensor | None = None,
) -> None:
    """Keep the gradient for `_saved_gradient`: formed in forward, or as the factors of its
    product; rows rescaled by the normaliser's divisors \\(s\\)
    (`row_normalization`) get their further \\(1/s\\).

    A `GradientProduct` is multiplied out in backward, with ``grad_total`` folded into its
    ``n x n`` coefficients: the ``[n, d]`` gradient is then written once, by the product, instead
    of being formed in forward, kept, read and scaled into a second ``[n, d]`` tensor.
    """
    if grad is None:
        return
    if isinstance(grad, GradientProduct):
        # an absent divisor is saved as None (save_for_backward takes it), read back as such
        ctx.save_for_backward(grad.coefficients, grad.rows, divisor)  # type: ignore[arg-type]
        return
    if divisor is not None:
        grad.div_(divisor)
    ctx.save_for_backward(grad)


def _saved_gradient(ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor) -> Tensor | None:
    """Backward of the pair-sum Functions: the gradient kept by `_save_gradient`, times ``grad_total``.

    Out of place, so that a graph kept with ``retain_graph=True`` can be backpropagated again
    (``gradcheck``, Jacobians).
    """
    if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
        return None
    scale = grad_total.reshape(*grad_total.shape, 1, 1)  # [batch] or [] against [..., n, d]
    saved = ctx.saved_tensors  # type: ignore[attr-defined]
    # the forward's products' precision (`product_precision`); float32 for Functions that set none
    precision: ProductPrecision = getattr(ctx, "precision", "float32")
    with passes_on_one_thread(grad_total.device), product_precision(precision):
        if len(saved) == 1:
            return saved[0] * scale
        coefficients, rows, divisor = saved
        grad = batched_matmul(coefficients * scale, rows)
        return grad if divisor is None else grad.div_(divisor)


class _PairwiseKernelSum(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        unit: Tensor,
        kernel: PairKernel,
        half_space: bool,
        block_rows: int,
        row_range: tuple[int, int] | None,
        precision: ProductPrecision,
    ) -> Tensor:
        with_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        ctx.precision = precision  # type: ignore[attr-defined]
        with passes_on_one_thread(unit.device), product_precision(precision):
            total, grad = _block_sums(unit, kernel, half_space, block_rows, with_grad, row_range)
            _save_gradient(ctx, grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor
    ) -> tuple[Tensor | None, None, None, None, None, None]:
        return _saved_gradient(ctx, grad_total), None, None, None, None, None


class _NormalizedPairwiseKernelSum(torch.autograd.Function):
    r"""`_PairwiseKernelSum` of the normalised rows of raw neurons, normalising inside.

    With \(\hat w = r w\), \(r = (\lVert w\rVert^2 + \epsilon)^{-1/2}\) and
    \(g = \partial S/\partial\hat w\) from the block sums,
    \(\partial\hat w/\partial w = r (I - \hat w\hat w^\top)\) (using
    \(\partial r/\partial w = -r^3 w\)), hence
    \(\partial S/\partial w = r\,(g - (g\cdot\hat w)\,\hat w)\), formed inside the block sums
    (`_fold_projection`) instead of by an autograd graph of the normalisation, with no host
    sync but the one check of `row_normalization`. Rows
    rescaled there by \(s\) (a constant, as in
    `normalize_neurons`) get a further \(1/s\).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        neurons: Tensor,
        eps: float,
        kernel: PairKernel,
        half_space: bool,
        block_rows: int,
        row_range: tuple[int, int] | None,
        check_finite: bool,
        precision: ProductPrecision,
        what: str,
    ) -> Tensor:
        with_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        ctx.precision = precision  # type: ignore[attr-defined]
        with passes_on_one_thread(neurons.device), product_precision(precision):
            rows, r, sq_norm, divisor = row_normalization(neurons, eps, what, check_finite=check_finite)
            # check_finite: the call makes host decisions anyway, so the kernel may too
            total, grad = _block_sums(
                rows, kernel, half_space, block_rows, with_grad, row_range, sq_norm, r, host_sync=check_finite
            )
            _save_gradient(ctx, grad, divisor)
        return total

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor
    ) -> tuple[Tensor | None, None, None, None, None, None, None, None, None]:
        return _saved_gradient(ctx, grad_total), None, None, None, None, None, None, None, None


def _schedule(
    rows: Tensor, kernel: PairKernel, chunk_size: int | None, shard: tuple[int, int] | None
) -> tuple[int, tuple[int, int] | None]:
    """Rows per block and the row range (``None``: upper strips over all rows) for ``[batch, n, d]`` ``rows``."""
    checked = check_shard(shard)
    # with shard: the same blocks, of full rows
    fused = rows.device.type == "cpu" and _fused_pairs(rows, kernel) is not None
    block_rows = symmetric_block_rows(rows.shape[1], chunk_size, rows.device.type, fused)
    if checked is None:
        return block_rows, None
    rank, world_size = checked
    return block_rows, shard_rows(rows.shape[1], rank, world_size)


def normalized_pairwise_kernel_sum(
    neurons: Tensor,
    kernel: PairKernel,
    *,
    eps: float,
    half_space: bool = False,
    chunk_size: int | None = None,
    shard: tuple[int, int] | None = None,
    check_finite: bool = True,
    precision: ProductPrecision = "float32",
    what: str = "neurons",
) -> Tensor:
    """`pairwise_kernel_sum` of ``normalize_neurons(neurons, eps)``, differentiable w.r.t. ``neurons``.

    ``neurons``: ``[batch, n, d]`` raw float32/float64 neurons. The same value and gradient as the
    composition to float rounding, in fewer passes and with a single host sync (the NaN/inf check:
    raises `NonFiniteInputError`). With
    ``check_finite=False`` there is no host sync at all (CUDA-graph safe) and non-finite neurons
    give a NaN sum instead (`row_normalization`). ``precision``: as in `pairwise_kernel_sum`.
    ``what`` names the rows in that error.
    """
    choice("normalized_pairwise_kernel_sum", "precision", precision, PRODUCT_PRECISIONS)
    block_rows, row_range = _schedule(neurons, kernel, chunk_size, shard)
    return _NormalizedPairwiseKernelSum.apply(
        neurons, float(eps), kernel, half_space, block_rows, row_range, bool(check_finite), precision, what
    )


def pairwise_kernel_sum(
    unit: Tensor,
    kernel: PairKernel,
    *,
    half_space: bool = False,
    chunk_size: int | None = None,
    shard: tuple[int, int] | None = None,
    precision: ProductPrecision = "float32",
) -> Tensor:
    """Sum of ``kernel`` over all pairs of the unit neurons ``unit`` (``[batch, n, d]``).

    Returns a ``[batch]`` tensor, differentiable with respect to ``unit``. See the module
    docstring for the formula and the two schedules.

    Args:
        unit: ``[batch, n, d]`` unit (or near-unit) neurons.
        kernel: the pair kernel and its derivative.
        half_space: sum over the pairs of \\(\\{\\pm\\hat w_i\\}\\).
        chunk_size: rows per block (``None``: strips of about `STRIP_ELEMENTS` Gram
            entries, i.e. dense for small layers; the same row counts with ``shard``).
        shard: ``(rank, world_size)``: compute only this rank's rows (`shard_rows`); the
            ranks' values and gradients sum exactly to the unsharded ones. Under a strategy that
            averages gradients multiply the result by `sharded_scale`.
        precision: operands of the Gram and gradient products (float32 tensors only):
            ``"float32"``, ``"tf32"`` or ``"bfloat16"``, accumulated in float32 either way
            (`_matmul.product_precision`; errors and when they are safe in `docs/performance.md`).
    """
    choice("pairwise_kernel_sum", "precision", precision, PRODUCT_PRECISIONS)
    block_rows, row_range = _schedule(unit, kernel, chunk_size, shard)
    return _PairwiseKernelSum.apply(unit, kernel, half_space, block_rows, row_range, precision)


def cosine_blocks(unit: Tensor, chunk_size: int | None) -> Iterator[tuple[int, Tensor]]:
    """The Gram matrix of ``[batch, n, d]`` unit rows in blocks of `block_rows_for` rows:
    ``(start, unit[:, start:stop] @ unit.T)``, each ``[batch, rows, n]``, computed as iterated."""
    n = unit.shape[1]
    rows = block_rows_for(n, chunk_size)
    transposed = unit.transpose(1, 2)
    for start in range(0, n, rows):
        yield start, batched_matmul(unit[:, start : start + rows], transposed)


@torch.no_grad()
def largest_pair_cosine(blocks: Iterable[tuple[int, Tensor]], *, half_space: bool) -> Tensor:
    r"""Largest cosine over all pairs of unit rows, per batch element (``[batch]``, no gradient).

    ``blocks``: the Gram matrix in row blocks ``(start, [batch, rows, n])`` (`cosine_blocks`, or
    ``[(0, gram)]`` when the caller has it), each left unchanged. The candidates are \(c_{ij}\),
    \(i \ne j\), and in half-space also \(-c_{ij}\) and the antipodal pairs' \(-c_{ii} =
    -\lVert\hat w_i\rVert^2\), read from the diagonal: one pass over each block for its
    minimum and maximum, and none over the ``[n, d]`` rows.
    """
    best: Tensor | None = None
    for start, cos in blocks:
        batch, rows, n = cos.shape
        if n < 2:
            raise ValueError("largest_pair_cosine needs at least two rows")
        diagonal = _self_pairs(cos, start)
        self_dots = diagonal.clone()
        # an off-diagonal entry of the block stands in for the diagonal: neutral for both extremes
        diagonal.copy_(cos[:, :1, 1 if start == 0 else 0].expand_as(diagonal))
        low, high = torch.aminmax(cos.reshape(batch, rows * n), dim=1)
        diagonal.copy_(self_dots)
        largest = torch.maximum(high, -low).maximum(-self_dots.amin(1)) if half_space else high
        best = largest if best is None else torch.maximum(best, largest)
    if best is None:
        raise ValueError("largest_pair_cosine got no blocks")
    return best
