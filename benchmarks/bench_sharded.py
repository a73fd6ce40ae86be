"""Sharded pairs across ranks: per-rank time of half-space MHE (value + gradient) for W ranks,
and exactness of the strategy's all-reduced gradient.

Each rank computes ``sharded_scale(W) * hyperspherical_energy(w, half_space=True, shard=(rank, W))``
and back-propagates; the gradients are all-reduced and divided by ``W`` (what DDP does) and
compared with the single-process full gradient. On CPU every rank is a gloo process with one
intra-op thread (W = 1 is timed the same way, so the per-rank time is comparable); with
``--device cuda`` rank ``r`` uses ``cuda:r`` with NCCL.

Usage: ``python benchmarks/bench_sharded.py [--n 4096 --d 512] [--worlds 1 2] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import machine, ms, table

from lightning_hsu.functional import hyperspherical_energy
from lightning_hsu.functional.pairwise import sharded_scale


def _weights(n: int, d: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


def _worker(rank: int, world: int, args: argparse.Namespace, init_file: str, out_dir: str) -> None:
    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    w = _weights(args.n, args.d).to(device).requires_grad_()
    times = []
    for rep in range(args.repeats + 1):
        w.grad = None
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = sharded_scale(world) * hyperspherical_energy(w, half_space=True, shard=(rank, world))
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
        if rep:
            times.append(time.perf_counter() - t0)
    grad = w.grad.clone()
    dist.all_reduce(grad)
    grad /= world
    torch.save({"time": statistics.median(times), "grad": grad.cpu()}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> tuple[float, torch.Tensor]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, args, os.path.join(out_dir, "init"), out_dir), nprocs=world, join=True)
        results = [torch.load(os.path.join(out_dir, f"r{r}.pt")) for r in range(world)]
    return max(r["time"] for r in results), results[0]["grad"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--worlds", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.worlds is None:
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        args.worlds = [w for w in (1, 2, 4, 8) if w <= max(gpus, 2)] if args.device == "cuda" else [1, 2]
    print(f"Machine: {machine()}\n")
    w = _weights(args.n, args.d).double().requires_grad_()
    hyperspherical_energy(w, half_space=True).backward()
    reference = w.grad.float()
    rows, base = [], None
    for world in args.worlds:
        if args.device == "cuda" and world > torch.cuda.device_count():
            continue
        per_rank, grad = run_world(world, args)
        base = base or per_rank
        err = float((grad - reference).abs().max() / reference.abs().max())
        rows.append([world, ms(per_rank), base / per_rank, f"{err:.1e}"])
    print(f"### Sharded half-space MHE, n = {args.n}, d = {args.d}, {args.device}, slowest rank's median\n")
    print(table(["ranks W", "per-rank ms", "speed-up vs W=1", "max rel. error of all-reduced grad (vs float64)"], rows))


if __name__ == "__main__":
    main()
