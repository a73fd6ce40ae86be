r"""Compressive MHE (CoMHE): Lin et al., *Regularizing Neural Networks via Minimizing Hyperspherical
Energy*, CVPR 2020.

Neurons are projected to a low dimension by ``count`` random Gaussian matrices
\(P_k\in\mathbb{R}^{p\times d}\), and the MHE of the projected neurons is averaged:

\[
R = \frac{1}{K}\sum_{k=1}^{K} E_s(P_k W).
\]

Angles are roughly preserved by a random projection (Johnson–Lindenstrauss) while the pair sums
cost \(O(n^2 p)\) instead of \(O(n^2 d)\). Official best on CIFAR-100: p = 40, K = 20.
All projections are evaluated in one batched pass.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_hsu.functional._common import (
    DEFAULT_EPS,
    NonFiniteInputError,
    as_batched,
    check_finite_neurons,
    check_neurons,
    full_precision,
)
from lightning_hsu.functional._matmul import ProductPrecision, batched_matmul, serial_passes
from lightning_hsu.functional.energy import Distance, hyperspherical_energy
from lightning_hsu.validation import positive_int


def gaussian_projections(
    in_dim: int,
    *,
    count: int,
    dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
) -> Tensor:
    """``[count, dim, in_dim]`` matrices with i.i.d. N(0, 1) entries (scale does not matter).

    Drawn on the generator's device (the CPU without one), then moved to ``device``: a CUDA
    generator draws them on the GPU, where they are used, instead of the host drawing and
    copying ``count * dim * in_dim`` numbers. With ``out`` (of that shape; its device and dtype
    replace ``device`` and ``dtype``) the same numbers are written into ``out`` in place and it
    is returned: a CUDA graph that reads ``out`` sees each new draw.
    """
    for name, value in (("count", count), ("dim", dim), ("in_dim", in_dim)):
        positive_int("gaussian_projections", name, value)
    draw_on = generator.device if generator is not None else torch.device("cpu")
    if out is not None:
        if out.shape != (count, dim, in_dim):
            raise ValueError(f"out must have shape {(count, dim, in_dim)}, got {tuple(out.shape)}")
        if out.device == draw_on:
            return torch.randn(count, dim, in_dim, generator=generator, dtype=out.dtype, device=draw_on, out=out)
        return out.copy_(torch.randn(count, dim, in_dim, generator=generator, dtype=out.dtype, device=draw_on))
    sample = torch.randn(count, dim, in_dim, generator=generator, dtype=dtype, device=draw_on)
    return sample.to(device) if device is not None else sample


class _Projection(torch.autograd.Function):
    r"""All projections of the neurons at once, \(Y_k = W P_k^\top\) (``[batch, K, n, p]`` from
    ``[batch, n, d]`` neurons and ``[batch, K, p, d]`` matrices), as one product per batch element
    with the ``[K p, d]`` stacked matrices, forward and backward.

    Through the library's products (`batched_matmul`,
    oneDNN on an x86 CPU) instead of ``einsum``, which autograd ran as MKL batched products:
    \(2Kpnd\) multiply-adds each way, more than the pair sums' \(n^2 p K\) for any layer
    with fewer than \(K p\) = 800 neurons (the official setting).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, neurons: Tensor, projections: Tensor) -> Tensor:
        batch, count, dim, in_dim = projections.shape
        stacked = projections.reshape(batch, count * dim, in_dim)
        ctx.save_for_backward(neurons, stacked)
        flat = batched_matmul(neurons, stacked.transpose(1, 2))  # [batch, n, K p]
        # the pair sums' products want each projection's rows dense
        return flat.view(batch, -1, count, dim).transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        neurons, stacked = ctx.saved_tensors  # type: ignore[attr-defined]
        batch, count, n, dim = grad.shape
        flat = grad.transpose(1, 2).reshape(batch, n, count * dim)  # [batch, n, K p]
        needs_neurons, needs_projections = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_neurons = batched_matmul(flat, stacked) if needs_neurons else None
        grad_projections = None
        if needs_projections:
            grad_projections = batched_matmul(flat.transpose(1, 2), neurons).view(batch, count, dim, -1)
        return grad_neurons, grad_projections


@full_precision
@serial_passes
def compressive_energy(
    neurons: Tensor,
    projections: Tensor,
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
    """Mean MHE of the neurons ``[n, d]`` under each projection in ``projections`` ``[K, p, d]``; of
    each matrix of a ``[batch, n, d]`` stack under its own ``[batch, K, p, d]`` projections
    (``[batch]`` values: the layers of one shape in one call).

    ``shard=(rank, world_size)`` computes this rank's share of the pairs of every projection
    (see `pairwise_kernel_sum`). ``check_finite=False``
    makes no host sync, as in `hyperspherical_energy`: NaN/inf
    neurons or projections give NaN instead of raising
    `NonFiniteInputError`. ``precision``: the operands of the pair sums' products, as in
    `hyperspherical_energy` (the projections themselves stay float32).
    """
    x = check_neurons(neurons, check_finite=check_finite)
    batch, added = as_batched(x)
    same_batch = added or projections.shape[:1] == x.shape[:1]
    if projections.dim() != x.dim() + 1 or projections.shape[-1] != x.shape[-1] or not same_batch:
        leading = "" if added else f"{x.shape[0]}, "
        raise ValueError(
            f"projections must have shape [{leading}count, dim, {x.shape[-1]}], got {tuple(projections.shape)}"
        )
    if check_finite:
        try:
            check_finite_neurons(projections, "projections")
        except NonFiniteInputError:
            raise NonFiniteInputError(
                f"projections contain NaN or inf entries (shape {tuple(projections.shape)})"
            ) from None
    per_batch = projections.unsqueeze(0) if added else projections
    projected = _Projection.apply(batch, per_batch.to(x.dtype))  # [batch, K, n, p]
    count = projected.shape[1]
    # R = mean_k E_s(P_k W): the energy of every projection at once (normalised in its pair sums)
    energy = hyperspherical_energy(
        projected.flatten(0, 1),
        power=power,
        distance=distance,
        half_space=half_space,
        eps=eps,
        chunk_size=chunk_size,
        shard=shard,
        check_finite=check_finite,
        precision=precision,
    )
    out = energy.view(-1, count).mean(1)
    return out[0] if added else out
