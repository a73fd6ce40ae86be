r"""Compressive MHE (CoMHE): Lin et al., *Regularizing Neural Networks via Minimizing Hyperspherical
Energy*, CVPR 2020.

Neurons are projected to a low dimension by ``count`` random Gaussian matrices
:math:`P_k\in\mathbb{R}^{p\times d}`, and the MHE of the projected neurons is averaged:

.. math:: R = \frac{1}{K}\sum_{k=1}^{K} E_s(P_k W).

Angles are roughly preserved by a random projection (Johnson–Lindenstrauss) while the pair sums
cost :math:`O(n^2 p)` instead of :math:`O(n^2 d)`. Official best on CIFAR-100: p = 40, K = 20.
All projections are evaluated in one batched pass.
"""

from __future__ import annotations

import threading

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
from lightning_hsu.functional._matmul import batched_matmul
from lightning_hsu.functional.energy import Distance, hyperspherical_energy

#: Numbers per CPU draw from which the projections are drawn by several threads (about 1 ms of
#: drawing, against ~0.1 ms to start a thread): PyTorch's CPU normal sampler runs on one core
#: (24.8 M numbers, a ResNet-18's CoMHE draws per step, took 96 ms at 1 or 2 intra-op threads,
#: 52 ms split over two threads).
PARALLEL_DRAW_NUMBERS = 2**18


def _draw_on_cpu(
    shape: tuple[int, int, int], generator: torch.Generator | None, dtype: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """The projections as ``count`` independent blocks, each from its own generator seeded by a
    number that ``generator`` draws, so that the blocks can be drawn by several threads and the
    numbers depend on ``generator`` alone, not on how many threads drew them. Written into ``out``
    (a contiguous CPU tensor of ``shape``) if given."""
    count = shape[0]
    seeds = torch.randint(0, 2**62, (count,), generator=generator).tolist()
    out = torch.empty(shape, dtype=dtype) if out is None else out

    def draw(blocks: range) -> None:
        for k in blocks:
            torch.randn(shape[1:], generator=torch.Generator().manual_seed(seeds[k]), dtype=dtype, out=out[k])

    workers = min(count, torch.get_num_threads()) if out.numel() >= PARALLEL_DRAW_NUMBERS else 1
    if workers <= 1:
        draw(range(count))
        return out
    # the sampler releases the GIL: threads draw in parallel; a fresh pool per call survives forks
    threads = [threading.Thread(target=draw, args=(range(i, count, workers),)) for i in range(1, workers)]
    for thread in threads:
        thread.start()
    draw(range(0, count, workers))
    for thread in threads:
        thread.join()
    return out


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
    copying ``count * dim * in_dim`` numbers. On the CPU each of the ``count`` matrices comes from
    its own generator, seeded by a number ``generator`` draws, so that large draws run on all
    intra-op threads (:data:`PARALLEL_DRAW_NUMBERS`) with the same numbers as on one. With
    ``out`` (of that shape; its device and dtype replace ``device`` and ``dtype``) the same
    numbers are written into ``out`` in place and it is returned: a CUDA graph that reads ``out``
    sees each new draw.
    """
    for name, value in (("count", count), ("dim", dim), ("in_dim", in_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    draw_on = generator.device if generator is not None else torch.device("cpu")
    shape = (count, dim, in_dim)
    if out is not None:
        if out.shape != shape:
            raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
        if draw_on.type != "cpu":
            return torch.randn(shape, generator=generator, dtype=out.dtype, device=draw_on, out=out)
        if out.device.type == "cpu" and out.is_contiguous():
            return _draw_on_cpu(shape, generator, out.dtype, out)
        return out.copy_(_draw_on_cpu(shape, generator, out.dtype))
    if draw_on.type != "cpu":
        sample = torch.randn(shape, generator=generator, dtype=dtype, device=draw_on)
    else:
        sample = _draw_on_cpu(shape, generator, dtype)
    return sample.to(device) if device is not None else sample


class _Projection(torch.autograd.Function):
    r"""All projections of the neurons at once, :math:`Y_k = W P_k^\top` (``[batch, K, n, p]`` from
    ``[batch, n, d]`` neurons and ``[batch, K, p, d]`` matrices), as one product per batch element
    with the ``[K p, d]`` stacked matrices, forward and backward.

    Through the library's products (:func:`~lightning_hsu.functional._matmul.batched_matmul`,
    oneDNN on an x86 CPU) instead of ``einsum``, which autograd ran as MKL batched products:
    :math:`2Kpnd` multiply-adds each way, more than the pair sums' :math:`n^2 p K` for any layer
    with fewer than :math:`K p` = 800 neurons (the official setting).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, neurons: Tensor, projections: Tensor) -> Tensor:  # type: ignore[override]
        batch, count, dim, in_dim = projections.shape
        stacked = projections.reshape(batch, count * dim, in_dim)
        ctx.save_for_backward(neurons, stacked)
        flat = batched_matmul(neurons, stacked.transpose(1, 2))  # [batch, n, K p]
        # the pair sums' products want each projection's rows dense
        return flat.view(batch, -1, count, dim).transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
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
) -> Tensor:
    """Mean MHE of the neurons ``[n, d]`` under each projection in ``projections`` ``[K, p, d]``; of
    each matrix of a ``[batch, n, d]`` stack under its own ``[batch, K, p, d]`` projections
    (``[batch]`` values: the layers of one shape in one call).

    ``shard=(rank, world_size)`` computes this rank's share of the pairs of every projection
    (see :func:`~lightning_hsu.functional.pairwise.pairwise_kernel_sum`). ``check_finite=False``
    makes no host sync, as in :func:`~lightning_hsu.functional.hyperspherical_energy`: NaN/inf
    neurons or projections give NaN instead of raising
    :class:`~lightning_hsu.functional.NonFiniteInputError`.
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
    )
    out = energy.view(-1, count).mean(1)
    return out[0] if added else out
