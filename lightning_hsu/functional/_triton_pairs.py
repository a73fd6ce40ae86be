r"""The pair-sum kernel's elementwise passes fused into one Triton kernel per block (CUDA).

On a GPU the eager pair sum (`lightning_hsu.functional.pairwise`) evaluates a kernel block in
about 65 small launches: the kernel value and slope at \(c\) and \(-c\), the clamps, the
half-space pairing, the self pairs, the folded projection, sums and copies, each a pass over the
``[rows, m]`` block (`docs/performance.md`, GPU section). This module does all of it in one
launch per block, plus one sum of its per-row partial values.

**What one launch computes.** For a block of Gram entries \(g_{ij}\) (rows \(i\), columns
\(j\), the self pair of local row \(k\) at column \(k + \text{diag}\)), with \(c_{ij}\) the
cosine (\(g_{ij}\), or \(r_i r_j g_{ij}\) when the rows are raw and \(r\) their normalising
factors) and \(s_i = \lVert\hat w_i\rVert^2\):

- per row, the sum of the pair terms \(p_{ij}\) over \(j \ne i\) (and over the leading
  ``width`` columns apart, for the strip schedule), with \(p = f(c) + f(-c)\) in half space,
  \(p = f(c)\) in full space, and the antipodal term \(f(-s_i)\) in half space;
- over the block, written in place of \(g\), the gradient coefficients: \(C_{ij} =
  2(f'(c_{ij}) - f'(-c_{ij}))\) and \(C_{ii} = -2 f'(-s_i)\) in half space, \(C_{ij} =
  f'(c_{ij})\) and \(C_{ii} = 0\) in full space; with the projection folded in,
  \(C'_{ij} = r_i (C_{ij} - \delta_{ij}\rho_i)\) with \(\rho_i = \sum_j C_{ij} c_{ij}\)
  (\(c_{ii} = s_i\)), times \(r_j\) for raw rows, so that one product \(C'' W\) is the
  gradient (`pairwise._fold_projection`).

**Why two passes over the columns.** \(\rho_i\) needs every column of row \(i\) before any
\(C'_{ij}\) is known. One program takes ``BLOCK_M`` rows and walks their columns twice: the first
walk sums the values and \(\rho\), the second recomputes the slopes (a few flops per entry)
and writes \(C''\). That reads the block twice and writes it once (12 bytes per entry in
float32); writing \(C\) in the first walk and rescaling it in a second kernel would read and
write it twice (16 bytes) and cost a launch. The GPU is bound by memory here, not by the flops
recomputed.

**Numerics.** The kernel formulas of `kernels.RieszKernel`, `kernels.GaussianKernel` and
`kernels.ClosestPairsKernel` are restated below, because a Triton kernel can only call Triton
functions; the same clamps (`kernels.MIN_SQUARED_DISTANCE`), the same order of operations
where it matters (the scaled cosine \((g_{ij} r_i) r_j\), the clamp that keeps a NaN), and
the parity tests (`tests/functional/fused_cases.py`, run by `test_triton_pairs.py`: value
and gradient against the eager path and a float64 statement of the formula) are the guarantee
that they agree. Only float32 is
fused; the sums differ from the eager path's in their order, i.e. in float32 rounding. A Riesz
power other than 0, 1 and 2 is evaluated as \(2^{-(s/2)\log_2 d^2}\) (no ``pow`` in Triton's
core language), a relative error of a few float32 ulps times \(s \lvert\log_2 d^2\rvert\).

The angular kernel is not fused: Triton's ``acos`` is a libdevice call, which Triton's
interpreter (where the parity tests run without a GPU) cannot execute. It and any other kernel
take the eager path.

Nothing here synchronises with the host or branches on the data, so the launch can be captured in
a CUDA graph (`lightning_hsu.cuda_graphs`). This module imports Triton; `pairwise` imports it only
when a fused block is about to run (`pairwise._fused_pairs`).
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_hsu.functional._fused_family import launch_parameters, supports
from lightning_hsu.functional.kernels import MIN_SQUARED_DISTANCE, PairKernel, RieszKernel

__all__ = ["pair_block_sums", "ready", "supports"]

#: Columns per tile of a program's walk along its rows.
BLOCK_N = 128
#: Programs per streaming multiprocessor aimed at when choosing the rows per program.
PROGRAMS_PER_SM = 2

_MIN_SQ: tl.constexpr = tl.constexpr(MIN_SQUARED_DISTANCE)


@triton.jit
def _kernel_terms(c, param, power, two_t, KIND: tl.constexpr, POWER_CASE: tl.constexpr):
    """f(c) and f'(c): `RieszKernel`, `GaussianKernel` or `ClosestPairsKernel`, restated for Triton.

    ``KIND`` and ``POWER_CASE`` are `_fused_family`'s integers, compared here as literals (a Triton
    function cannot read a module's Python ints); each value compiles its own kernel."""
    if KIND == 0:  # RIESZ: d^2 = max(2 - 2c, 1e-6); the comparison keeps a NaN, as clamp_min does
        raw = 2.0 - 2.0 * c
        sq = tl.where(raw < _MIN_SQ, _MIN_SQ, raw)
        if POWER_CASE == 0:  # LOG_POWER
            value = -tl.log(sq)
            slope = (1.0 / sq) * 2.0
        elif POWER_CASE == 1:  # INVERSE_SQUARE
            value = 1.0 / sq
            slope = value * value * 2.0
        elif POWER_CASE == 2:  # INVERSE
            value = tl.rsqrt(sq)
            slope = value / sq * power
        else:  # OTHER_POWER: no pow in Triton's core language
            value = tl.exp2(tl.log2(sq) * (-0.5 * power))
            slope = value / sq * power
        slope = tl.where(raw > _MIN_SQ, slope, 0.0)  # no slope where the clamp holds
    elif KIND == 1:  # GAUSSIAN: exp(2t (c - 1) - shift)
        value = tl.exp((c - 1.0) * two_t - param)
        slope = value * two_t
    else:  # CLOSEST_PAIRS: 2c - 2 where c reaches the threshold (times the mask: a NaN stays NaN)
        closest = (c >= param).to(tl.float32)
        value = (1.0 - c) * -2.0 * closest
        slope = closest * 2.0
    return value, slope


@triton.jit
def _pair_terms(c, param, power, two_t, KIND: tl.constexpr, POWER_CASE: tl.constexpr, HALF: tl.constexpr):
    """The term of an ordered pair and its coefficient: f(c) + f(-c), 2 (f'(c) - f'(-c)) in half space."""
    value, slope = _kernel_terms(c, param, power, two_t, KIND, POWER_CASE)
    if HALF:
        value_neg, slope_neg = _kernel_terms(-c, param, power, two_t, KIND, POWER_CASE)
        value = value + value_neg
        slope = (slope - slope_neg) * 2.0
    return value, slope


@triton.jit
def _pair_block_kernel(
    gram_ptr,
    stride_gb,
    stride_gr,
    stride_gc,
    sq_ptr,
    stride_sb,
    stride_sr,
    row_scale_ptr,
    stride_rb,
    stride_rr,
    col_scale_ptr,
    stride_cb,
    stride_cc,
    param_ptr,
    stride_p,
    out_ptr,
    rows,
    m,
    diag,
    width,
    power,
    two_t,
    KIND: tl.constexpr,
    POWER_CASE: tl.constexpr,
    HALF: tl.constexpr,
    FOLD: tl.constexpr,
    RAW_GRAM: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    batches = tl.num_programs(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    self_col = offs_m + diag
    sq_i = tl.load(sq_ptr + batch * stride_sb + offs_m * stride_sr, mask=row_ok, other=0.0)
    param = tl.load(param_ptr + batch * stride_p)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if FOLD:
        r_i = tl.load(row_scale_ptr + batch * stride_rb + offs_m * stride_rr, mask=row_ok, other=0.0)
    zeros = tl.zeros([BLOCK_M], dtype=tl.float32)
    anti = zeros
    self_coeff = zeros
    if HALF:  # the pair (i, -i): cosine -|w_i|^2, once per row
        anti_value, anti_slope = _kernel_terms(-sq_i, param, power, two_t, KIND, POWER_CASE)
        anti = tl.where(row_ok, anti_value, 0.0)
        self_coeff = anti_slope * -2.0
    rho = self_coeff * sq_i  # the self pair's share of rho_i = sum_j C_ij c_ij (c_ii = |w_i|^2)
    pair_sum = zeros
    tile_sum = zeros
    gram_rows = gram_ptr + batch * stride_gb + offs_m[:, None] * stride_gr
    # first walk: the values, and rho for the projection
    for start in range(0, m, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        inside = row_ok[:, None] & (offs_n < m)[None, :]
        off_diagonal = inside & (offs_n[None, :] != self_col[:, None])
        c = tl.load(gram_rows + offs_n[None, :] * stride_gc, mask=inside, other=0.0)
        if RAW_GRAM:
            r_j = tl.load(col_scale_ptr + batch * stride_cb + offs_n * stride_cc, mask=offs_n < m, other=0.0)
            c = c * r_i[:, None] * r_j[None, :]
        value, coeff = _pair_terms(c, param, power, two_t, KIND, POWER_CASE, HALF)
        value = tl.where(off_diagonal, value, 0.0)
        pair_sum += tl.sum(value, axis=1)
        tile_sum += tl.sum(tl.where((offs_n < width)[None, :], value, 0.0), axis=1)
        if FOLD and WITH_GRAD:
            rho += tl.sum(tl.where(off_diagonal, coeff * c, 0.0), axis=1)
    out_rows = out_ptr + batch * rows + offs_m
    plane = batches * rows
    tl.store(out_rows, pair_sum, mask=row_ok)
    tl.store(out_rows + plane, tile_sum, mask=row_ok)
    tl.store(out_rows + 2 * plane, anti, mask=row_ok)
    if WITH_GRAD:
        diagonal_coeff = self_coeff
        if FOLD:
            diagonal_coeff = self_coeff - rho
        # second walk: the slopes again (cheaper than storing and reloading them), written as C''
        for start in range(0, m, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            inside = row_ok[:, None] & (offs_n < m)[None, :]
            on_diagonal = offs_n[None, :] == self_col[:, None]
            c = tl.load(gram_rows + offs_n[None, :] * stride_gc, mask=inside, other=0.0)
            r_j = tl.zeros([BLOCK_N], dtype=tl.float32)
            if RAW_GRAM:
                r_j = tl.load(col_scale_ptr + batch * stride_cb + offs_n * stride_cc, mask=offs_n < m, other=0.0)
                c = c * r_i[:, None] * r_j[None, :]
            _, coeff = _pair_terms(c, param, power, two_t, KIND, POWER_CASE, HALF)
            coeff = tl.where(on_diagonal, diagonal_coeff[:, None], coeff)
            if FOLD:
                coeff = coeff * r_i[:, None]
            if RAW_GRAM:
                coeff = coeff * r_j[None, :]
            tl.store(gram_rows + offs_n[None, :] * stride_gc, coeff, mask=inside)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: the fewer, the faster
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rows_per_program(batch: int, rows: int, device: torch.device) -> int:
    """About `PROGRAMS_PER_SM` programs per multiprocessor, 4 to 32 rows each (a power of two)."""
    target = -(-batch * rows // (PROGRAMS_PER_SM * _multiprocessors(device)))
    return max(4, min(32, triton.next_power_of_2(max(target, 1))))


#: Whether the kernel launched on a device (`ready`), per device tried.
_READY: dict[torch.device, bool] = {}


def ready(device: torch.device, *, may_probe: bool = True) -> bool:
    """Whether the kernel compiles and launches on ``device``: tried once per device on a 2 x 2 block.

    Triton builds its launcher with the machine's C compiler and compiles for the device's
    architecture at the first launch; where either fails, the pair sums keep the eager path (with
    one warning) instead of failing the training step. The probe reads nothing back (no host
    sync). ``may_probe=False`` (during a CUDA graph capture) answers ``False`` for an untried device.
    """
    known = _READY.get(device)
    if known is not None or not may_probe:
        return bool(known)
    block = torch.zeros(1, 2, 2, device=device)
    try:
        pair_block_sums(block, 0, RieszKernel(2.0), half_space=True, sq=torch.ones(1, 2, device=device), with_grad=True)
    except Exception as err:  # whatever the toolchain raises: the eager path stays correct
        warnings.warn(
            f"the fused Triton pair-sum kernel failed to launch on {device} ({type(err).__name__}: {err}); "
            "the pair sums use the eager path",
            RuntimeWarning,
            stacklevel=2,
        )
        _READY[device] = False
    else:
        _READY[device] = True
    return _READY[device]


def pair_block_sums(
    block: Tensor,
    diag: int,
    kernel: PairKernel,
    *,
    half_space: bool,
    sq: Tensor,
    with_grad: bool,
    row_scale: Tensor | None = None,
    col_scale: Tensor | None = None,
    width: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Sums of a block's pair terms, and its gradient coefficients written over it, in one launch.

    Args:
        block: ``[batch, rows, m]`` float32 Gram entries (any strides); the self pair of row
            ``k`` is at column ``k + diag``. Overwritten with the coefficients when ``with_grad``
            (see the module docstring), left as it is otherwise.
        diag: column of row 0's self pair.
        kernel: a kernel for which `supports` holds.
        half_space: pair terms \(f(c) + f(-c)\) and the antipodal terms, else \(f(c)\).
        sq: ``[batch, rows]`` squared norms \(\lVert\hat w_i\rVert^2\) of the block's rows.
        with_grad: write the coefficients.
        row_scale: ``[batch, rows]`` factors \(r_i\): fold the projection onto the sphere into
            the coefficients (every column of the rows must be in the block).
        col_scale: ``[batch, m]`` factors \(r_j\) (with ``row_scale``): the entries are raw
            products \(w_i\cdot w_j\), the cosines \((g_{ij} r_i) r_j\), and the
            coefficients come out times \(r_j\).
        width: the leading columns whose pair terms are also summed apart (``None``: none).

    Returns:
        ``[batch]`` sums over the block of the pair terms (self pairs excluded), of those in the
        leading ``width`` columns, and of the antipodal terms (zero in full space).
    """
    batch, rows, m = block.shape
    kind, power_case, power, two_t, param, stride_p = launch_parameters(block, kernel, row_scale, col_scale)
    out = block.new_empty(3, batch, rows)
    rows_scale = row_scale if row_scale is not None else sq  # unread without FOLD
    cols_scale = col_scale if col_scale is not None else sq  # unread without RAW_GRAM
    block_m = _rows_per_program(batch, rows, block.device)
    grid = (triton.cdiv(rows, block_m), batch)
    _pair_block_kernel[grid](
        block,
        block.stride(0),
        block.stride(1),
        block.stride(2),
        sq,
        sq.stride(0),
        sq.stride(1),
        rows_scale,
        rows_scale.stride(0),
        rows_scale.stride(1),
        cols_scale,
        cols_scale.stride(0),
        cols_scale.stride(1),
        param,
        stride_p,
        out,
        rows,
        m,
        diag,
        m if width is None else width,
        power,
        two_t,
        KIND=kind,
        POWER_CASE=power_case,
        HALF=bool(half_space),
        FOLD=row_scale is not None,
        RAW_GRAM=col_scale is not None,
        WITH_GRAD=bool(with_grad),
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
    )
    pair, tile, anti = out.sum(2)
    return pair, tile, anti
