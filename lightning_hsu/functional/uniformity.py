r"""Uniformity of Wang & Isola, *Understanding Contrastive Representation Learning through
Alignment and Uniformity on the Hypersphere*, ICML 2020.

\[
\mathcal{U}_t = \log \frac{1}{P}\sum_{i<j} e^{-t\lVert\hat x_i - \hat x_j\rVert^2},
\]

a Gaussian-kernel energy (lower is more uniform; its optimum in high dimension is about
\(-2t\)), computed as a log-sum-exp so it never underflows, whatever ``t``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_hsu.functional._common import (
    DEFAULT_EPS,
    as_batched,
    check_neurons,
    full_precision,
    normalize_neurons,
)
from lightning_hsu.functional._matmul import serial_passes
from lightning_hsu.functional.kernels import GaussianKernel
from lightning_hsu.functional.pairwise import extreme_pair_cosine, pair_count, pairwise_kernel_sum


def log_mean_exp_pairs(
    unit: Tensor, t: float, *, half_space: bool, chunk_size: int | None, host_sync: bool = True
) -> Tensor:
    r"""\(\log \frac1P\sum_{pairs} e^{-t d^2}\) for ``[n, d]`` unit vectors (a scalar), or each
    of ``[batch, n, d]`` (``[batch]``); 0 when n < 2.

    The exponent is shifted by its maximum \(m = 2t(c_{max}-1)\) (a constant: the value does
    not depend on it, so neither does the gradient) before exponentiation, one shift per batch
    element. ``host_sync=False`` keeps \(m\) a device tensor: no host sync (CUDA-graph
    safe), the same value; so does a batch (its shifts differ per element).
    """
    batch, added = as_batched(unit)
    n = batch.shape[1]
    if n < 2:
        out = batch.sum((1, 2)) * 0.0
    else:
        c_max = extreme_pair_cosine(batch, half_space=half_space, chunk_size=chunk_size, largest=True)
        shift_tensor = 2.0 * t * (c_max - 1.0)
        shift: float | Tensor = float(shift_tensor[0]) if host_sync and added else shift_tensor
        total = pairwise_kernel_sum(batch, GaussianKernel(t, shift), half_space=half_space, chunk_size=chunk_size)
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
    x = check_neurons(features, "features", check_finite=check_finite)
    unit = normalize_neurons(x, eps, host_sync=check_finite)
    return log_mean_exp_pairs(unit, float(t), half_space=half_space, chunk_size=chunk_size, host_sync=check_finite)
