"""Sharded pair sums: the ranks' values and gradients add up exactly to the unsharded ones."""

from __future__ import annotations

import itertools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_hsu.functional import hyperspherical_energy
from lightning_hsu.functional.kernels import GaussianKernel, RieszKernel
from lightning_hsu.functional.pairwise import pairwise_kernel_sum, shard_rows, sharded_scale

from .reference import value_and_grad


def _weights(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("chunk", [None, 5])
def test_shards_sum_to_the_full_value_and_gradient(world_size: int, half_space: bool, chunk: int | None) -> None:
    w = _weights(45, 7)
    full, full_grad = value_and_grad(lambda x: hyperspherical_energy(x, half_space=half_space, chunk_size=chunk), w)
    values, grads = [], []
    for rank in range(world_size):
        value, grad = value_and_grad(
            lambda x, r=rank: hyperspherical_energy(x, half_space=half_space, chunk_size=chunk, shard=(r, world_size)),
            w,
        )
        start, stop = shard_rows(45, rank, world_size)
        outside = torch.ones(45, dtype=torch.bool)
        outside[start:stop] = False
        assert torch.all(grad[outside] == 0), "a rank's gradient lives on its own rows only"
        values.append(value)
        grads.append(grad)
    torch.testing.assert_close(sum(values), full, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(sum(grads), full_grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("half_space", [False, True])
def test_batched_kernel_sum_shards(half_space: bool) -> None:
    unit = torch.nn.functional.normalize(_weights(2 * 33, 4), dim=-1).reshape(2, 33, 4)
    kernel = GaussianKernel(2.0)
    full, full_grad = value_and_grad(lambda u: pairwise_kernel_sum(u, kernel, half_space=half_space).sum(), unit)
    parts = [
        value_and_grad(lambda u, r=r: pairwise_kernel_sum(u, kernel, half_space=half_space, shard=(r, 3)).sum(), unit)
        for r in range(3)
    ]
    torch.testing.assert_close(sum(p[0] for p in parts), full)
    torch.testing.assert_close(sum(p[1] for p in parts), full_grad)


def test_shard_rows_are_balanced_and_cover_everything() -> None:
    for n in (1, 7, 64, 1001):
        for world_size in (1, 2, 3, 8):
            bounds = [shard_rows(n, r, world_size) for r in range(world_size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_more_ranks_than_neurons_gives_empty_shards() -> None:
    w = _weights(3, 4)
    full = hyperspherical_energy(w)
    parts = [hyperspherical_energy(w, shard=(r, 5)) for r in range(5)]
    torch.testing.assert_close(sum(parts), full)


@pytest.mark.parametrize("bad", [(2, 2), (-1, 2), (0, 0), (0.5, 2), (0,), "01", (True, 2)])
def test_invalid_shard_is_rejected(bad) -> None:
    with pytest.raises(ValueError, match="shard"):
        pairwise_kernel_sum(torch.randn(1, 4, 3), RieszKernel(2.0), shard=bad)


def test_sharded_scale() -> None:
    assert sharded_scale(4) == 4.0
    with pytest.raises(ValueError):
        sharded_scale(0)


# --- real processes --------------------------------------------------------------------------

_STEPS = 3
_LAMBDA = 0.5


def _model_and_data() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 10)
    x = torch.randn(16, 6)
    y = torch.randn(16, 10)
    return model, x, y


def _train(model: torch.nn.Module, layer: torch.nn.Linear, x, y, shard: tuple[int, int] | None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scale = sharded_scale(shard[1]) if shard is not None else 1.0
    for _ in range(_STEPS):
        opt.zero_grad()
        penalty = hyperspherical_energy(layer.weight, half_space=True, shard=shard)
        loss = torch.nn.functional.mse_loss(model(x), y) + _LAMBDA * scale * penalty
        loss.backward()
        opt.step()


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # 1) one gradient: the scaled shards averaged over ranks give the full gradient
        w = _weights(23, 5).float().requires_grad_()
        (sharded_scale(world_size) * hyperspherical_energy(w, half_space=True, shard=(rank, world_size))).backward()
        grad = w.grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo has no AVG: SUM / W is what DDP does
        grad /= world_size
        # 2) DDP training, every rank on the same data: the weights equal the unsharded run
        model, x, y = _model_and_data()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        _train(ddp, model, x, y, shard=(rank, world_size))
        torch.save({"grad": grad, "weight": model.weight.detach().clone()}, os.path.join(out_dir, f"rank{rank}.pt"))
        # Leave without tearing down gloo: its destructors join worker threads while holding the
        # GIL, which deadlocked or aborted a rank now and then (seen in clean-clone CI runs).
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)


@pytest.mark.distributed
def test_gloo_two_processes_average_to_the_full_gradient() -> None:
    world_size = 2
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_worker, args=(world_size, init_file, out_dir), nprocs=world_size, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]
    w = _weights(23, 5).float().requires_grad_()
    hyperspherical_energy(w, half_space=True).backward()
    model, x, y = _model_and_data()
    _train(model, model, x, y, shard=None)
    for result in results:
        torch.testing.assert_close(result["grad"], w.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(result["weight"], model.weight.detach(), rtol=1e-5, atol=1e-7)
