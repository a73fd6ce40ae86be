r"""Uniformity of Wang & Isola, *Understanding Contrastive Representation Learning through
Alignment and Uniformity on the Hypersphere*, ICML 2020.

\[
\mathcal{U}_t = \log \frac{1}{P}\sum_{i<j} e^{-t\lVert\hat x_i - \hat x_j\rVert^2},
\]

a Gaussian-kernel energy (lower is more uniform; its optimum in high dimension is about
\(-2t\)). It is one pair sum of the raw rows, normalised inside, as MHE is; for a ``t`` so large
that a kernel value could underflow, a log-sum-exp shifted by its largest term, so it never
underflows, whatever ``t``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_hsu.functional._common import (
    DEFAULT_EPS,
    as_batched,
    check_finite_neurons,
    check_neurons,
    full_precision,
    row_normalization,
)
from lightning_hsu.functional._matmul import serial_passes
from lightning_hsu.functional.kernels import GaussianKernel
from lightning_hsu.functional.pairwise import (
    cosine_blocks,
    largest_pair_cosine,
    normalized_pairwise_kernel_sum,
    pair_count,
)


def gaussian_shift_needed(t: float, dtype: torch.dtype) -> bool:
    r"""Whether \(e^{-t d^2}\) of unit vectors may underflow in ``dtype``, so that
    `log_mean_exp_pairs` must shift its exponent.

    \(d^2 \le 4\) on the unit sphere, so every kernel value is at least \(e^{-4t}\); when that
    is a normal number with \(2^{16}\) to spare (float32: \(t \le 19\), float64: \(t \le 174\)),
    no term underflows and the shift (a search over all pairs, as costly as the Gram product) is
    not needed.
    """
    return -4.0 * t < math.log(torch.finfo(dtype).tiny) + 16.0 * math.log(2.0)


@serial_passes
def gaussian_shift(unit: Tensor, t: float, *, half_space: bool, chunk_size: int | None) -> Tensor:
    r"""The largest exponent \(m = 2t(c_{max}-1)\) of the Gaussian kernel over the pairs of each
    ``[batch, n, d]`` unit-row matrix (``[batch]``, no gradient): the log-sum-exp's shift."""
    c_max = largest_pair_cosine(cosine_blocks(unit, chunk_size), half_space=half_space)
    return 2.0 * t * (c_max - 1.0)


def log_mean_exp_pairs(
    neurons: Tensor,
    t: float,
    *,
    eps: float,
    half_space: bool,
    chunk_size: int | None,
    check_finite: bool = True,
    what: str = "neurons",
) -> Tensor:
    r"""\(\log \frac1P\sum_{pairs} e^{-t d^2}\) of the normalised rows of raw ``[n, d]`` neurons
    (a scalar), or of each of ``[batch, n, d]`` (``[batch]``); 0 when n < 2.

    One pair sum of the raw rows, normalised inside (`normalized_pairwise_kernel_sum`).
    Where a term could underflow (`gaussian_shift_needed`: large ``t``) the exponent is
    shifted by its maximum \(m = 2t(c_{max}-1)\), one shift per batch element: a constant, so
    neither the value nor the gradient depends on it. ``check_finite=False``: no host sync (CUDA-graph
    safe), the shift then stays a device tensor; NaN/inf rows give NaN. ``what`` names the rows in
    the error for NaN/inf rows.
    """
    batch, added = as_batched(neurons)
    n = batch.shape[1]
    if n < 2:  # no pair: nothing is normalised, so the check is here
        if check_finite:
            check_finite_neurons(batch, what)
        out = batch.sum((1, 2)) * 0.0
        return out[0] if added else out
    shift: float | Tensor = 0.0
    if gaussian_shift_needed(t, batch.dtype):
        with torch.no_grad():  # `rows` may be the neurons themselves: `rows * r` would be recorded
            rows, r, _, _ = row_normalization(batch, eps, what, check_finite=check_finite)
            shift_tensor = gaussian_shift(rows * r, t, half_space=half_space, chunk_size=chunk_size)
        shift = float(shift_tensor[0]) if check_finite and added else shift_tensor
    total = normalized_pairwise_kernel_sum(
        batch,
        GaussianKernel(t, shift),
        eps=eps,
        half_space=half_space,
        chunk_size=chunk_size,
        check_finite=check_finite,
        what=what,
    )
    out = shift + torch.log(total) - math.log(pair_count(n, half_space))
    return out[0] if added else out


@full_precision
@serial_passes
def uniformity(
    features: Tensor,
    *,
    t: float = 2.0,
    half_space: bool = False,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Wang–Isola uniformity of the rows of ``features`` (``[n, d]``), normalised first; of each
    matrix of a ``[batch, n, d]`` stack (``[batch]`` values).

    Args:
        features: rows are vectors (neurons of a layer, or a batch of embeddings).
        t: kernel temperature (the paper's default is 2).
        half_space: use \\(\\{\\pm x_i\\}\\), as for hidden-layer neurons.
        eps: normaliser as in the official MHE code.
        chunk_size: rows per block (``None``: automatic).
        check_finite: raise `NonFiniteInputError` for NaN/inf
            rows. ``False``: no host sync at all (CUDA-graph safe); NaN/inf rows give NaN.

    Examples:
        >>> import torch
        >>> tri = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])  # 120 degrees apart
        >>> from lightning_hsu.functional import uniformity
        >>> round(float(uniformity(tri, t=2.0)), 3)  # log exp(-2 * 3)
        -6.0
    """
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"t must be a finite number > 0, got {t!r}")
    x = check_neurons(features, "features", check_finite=False)  # checked when normalised
    return log_mean_exp_pairs(
        x, float(t), eps=eps, half_space=half_space, chunk_size=chunk_size, check_finite=check_finite, what="features"
    )
