r"""Minimum hyperspherical energy (MHE): Liu et al., *Learning towards Minimum Hyperspherical
Energy*, NeurIPS 2018 (arXiv:1805.09298).

\[
E_s(\hat W) = \frac{1}{P}\sum_{i<j} f_s(\operatorname{dist}(\hat w_i, \hat w_j)),
\qquad P = n(n-1)/2,
\]

with Euclidean \(f_s = d^{-s}\) (\(s>0\), the Riesz s-energy), \(f_0 = -\log d^2\),
or angular \(\tilde\theta^{-s}\), \(-\log\tilde\theta\). In half-space the \(2n\)
vectors \(\{\pm\hat w_i\}\) are used (\(P = n(2n-1)\)).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_hsu.functional._common import (
    DEFAULT_EPS,
    NonFiniteInputError,
    as_batched,
    check_finite_neurons,
    check_neurons,
    full_precision,
    normalize_neurons,
)
from lightning_hsu.functional._matmul import ProductPrecision
from lightning_hsu.functional.kernels import PairKernel, energy_kernel
from lightning_hsu.functional.pairwise import normalized_pairwise_kernel_sum, pair_count, pairwise_kernel_sum

Distance = Literal["euclidean", "angular"]


def mean_pair_kernel(
    unit: Tensor,
    kernel: PairKernel,
    *,
    half_space: bool,
    chunk_size: int | None,
    shard: tuple[int, int] | None = None,
    eps: float | None = None,
    check_finite: bool = True,
    precision: ProductPrecision = "float32",
) -> Tensor:
    """Mean of ``kernel`` over all pairs of ``[batch, n, d]`` unit neurons; 0 when n < 2.

    With ``shard`` it is this rank's share (`pairwise_kernel_sum`).
    With ``eps`` the rows of ``unit`` are raw neurons, normalised (and checked for NaN/inf) here
    as by `normalize_neurons` with that ``eps``, in one
    fused pass (`normalized_pairwise_kernel_sum`);
    ``check_finite=False`` (with ``eps``) skips that check, and its host sync: non-finite neurons
    then give NaN. ``precision``: the operands of its products (`pairwise_kernel_sum`).
    """
    n = unit.shape[1]
    if n < 2:
        if eps is None or check_finite:
            if eps is not None:
                check_finite_neurons(unit)
                unit = normalize_neurons(unit, eps)
            return unit.sum((1, 2)) * 0.0
        return (unit * 0.0).sum((1, 2))  # NaN exactly where a neuron is NaN or inf, without a sync
    if eps is not None:
        total = normalized_pairwise_kernel_sum(
            unit,
            kernel,
            eps=eps,
            half_space=half_space,
            chunk_size=chunk_size,
            shard=shard,
            check_finite=check_finite,
            precision=precision,
        )
    else:
        total = pairwise_kernel_sum(
            unit, kernel, half_space=half_space, chunk_size=chunk_size, shard=shard, precision=precision
        )
    return total / pair_count(n, half_space)


@full_precision
def hyperspherical_energy(
    neurons: Tensor,
    *,
    power: float = 2.0,
    distance: Distance = "euclidean",
    half_space: bool = False,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
    shard: tuple[int, int] | None = None,
    check_finite: bool = True,
    precision: ProductPrecision = "float32",
) -> Tensor:
    r"""Hyperspherical energy of the neurons (rows) of ``neurons``.

    Args:
        neurons: ``[n, d]`` or ``[batch, n, d]``; rows are neurons. Any float dtype; computed in
            float32 (float64 stays float64).
        power: Riesz exponent \(s \ge 0\); 0 is the log energy (official ``'0'``/``'a0'``).
        distance: ``'euclidean'`` (chordal, official ``'0' '1' '2'``) or ``'angular'``
            (\(\tilde\theta = \theta/\pi + 10^{-4}\), official ``'a0' 'a1' 'a2'``).
        half_space: regularise \(\{\hat w_i\}\cup\{-\hat w_i\}\), computed from the
            \(n\times n\) Gram matrix (never by concatenation).
        eps: normaliser \(\hat w = w/\sqrt{\lVert w\rVert^2+\epsilon}\) (official 1e-4).
        chunk_size: rows per block; ``None`` picks dense up to 4096 neurons, then blocks.
        shard: ``(rank, world_size)``: this rank's share of the pairs; the shares' values and
            gradients sum to the full ones. Under DDP/FSDP (which average gradients) multiply by
            ``world_size`` (`sharded_scale`).
        check_finite: raise `NonFiniteInputError` for NaN/inf
            neurons (one host sync). ``False``: no host sync and no decision on the data, so the
            call can be captured in a CUDA graph; NaN/inf neurons then give a NaN energy (and
            gradient), for the caller to check once for many layers.
        precision: operands of the Gram and gradient products, ``"float32"`` (exact to float32
            rounding), ``"tf32"`` or ``"bfloat16"`` (faster on a GPU's tensor cores; accumulated in
            float32; measured errors and when they are safe: `docs/performance.md`, "TF32 and
            bfloat16 products"). Float64 neurons ignore it.

    Returns:
        The mean pair energy (a scalar, or ``[batch]``); 0 for fewer than two neurons.

    Differences from the official code, each to stay finite where it is not: \(d^2\) is
    clamped at \(10^{-6}\) (duplicate neurons) and cosines at \(\pm(1-10^{-6})\) before
    ``arccos``. For s = 0 the Euclidean value is \(-\log d^2\), twice the log energy, as in
    the official code.

    Examples:
        >>> import torch
        >>> tri = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])  # 120 degrees apart
        >>> from lightning_hsu.functional import hyperspherical_energy
        >>> round(float(hyperspherical_energy(tri, power=2.0)), 4)  # 1/d^2 with d^2 = 3
        0.3333
        >>> round(float(hyperspherical_energy(tri, power=2.0, half_space=True)), 4)
        0.5833
    """
    kernel = energy_kernel(power, distance)
    batched, added = as_batched(check_neurons(neurons, check_finite=False))  # checked when normalised
    try:
        energy = mean_pair_kernel(
            batched,
            kernel,
            half_space=half_space,
            chunk_size=chunk_size,
            shard=shard,
            eps=eps,
            check_finite=check_finite,
            precision=precision,
        )
    except NonFiniteInputError:
        check_finite_neurons(neurons)  # raises again, with the caller's shape
        raise
    return energy[0] if added else energy
