"""A 100,000 x 512 classifier: exact MHE and gradient in chunks, peak memory, and the sampled estimate.

On the CPU each measurement runs in a fresh subprocess and reports its peak resident memory
(``resource.getrusage(...).ru_maxrss``); a baseline subprocess only builds the weight (and its
gradient buffer), so the difference is what the penalty adds. On CUDA the peak is the allocator's
(``torch.cuda.max_memory_allocated`` after a reset), so the measurements run in one process: a
fresh process per measurement spent its time starting CUDA. The dense Gram matrix alone would
need ``n^2 * 4`` bytes (40 GB for n = 100,000).

1. Memory vs chunk size: the rows of one shard (``shard=(0, S)``, two blocks of ``chunk`` rows)
   run with ``chunk`` in {128, 512, 2048}: the peak does not depend on how many blocks run, so
   this measures the per-block memory at full n without the full run time.
2. The exact full-space penalty and gradient over all pairs (automatic strips).
3. The sampled estimate (random subsets of m neurons; the classes of a batch of 512 labels) and
   its relative error against the exact value.

Usage: ``python benchmarks/bench_huge.py [--n 100000] [--d 512] [--skip-exact] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from _common import machine, table

from lightning_hsu.functional import hyperspherical_energy
from lightning_hsu.functional.sampling import sampled_hyperspherical_energy, subset_hyperspherical_energy

HERE = os.path.dirname(os.path.abspath(__file__))


def _weight(n: int, d: int, device: str) -> torch.Tensor:
    """Class vectors with structure (100 loose clusters), so that pair energies vary."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(100, d, generator=g)
    w = torch.randn(n, d, generator=g)
    w.add_(centres[torch.arange(n) % 100], alpha=0.7)
    return w.to(device).requires_grad_()


def _peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args: argparse.Namespace) -> dict[str, float]:
    w = _weight(args.n, args.d, args.device)
    w.grad = torch.zeros_like(w)  # the baseline owns the gradient buffer too
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.worker == "exact":
        shard = (0, args.shards) if args.shards > 1 else None
        value = hyperspherical_energy(w, chunk_size=args.chunk, shard=shard)
        value.backward()
        out["value"] = float(value) * (args.shards if shard else 1)
    elif args.worker == "sampled":
        g = torch.Generator().manual_seed(args.seed)
        value, stderr = sampled_hyperspherical_energy(w, args.m, generator=g, draws=args.draws, return_stderr=True)
        value.backward()
        out["value"], out["stderr"] = float(value), float(stderr)
    elif args.worker == "batch":
        g = torch.Generator().manual_seed(args.seed)
        labels = torch.randint(0, args.n, (args.m,), generator=g)
        value = subset_hyperspherical_energy(w, labels)
        value.backward()
        out["value"] = float(value)
    if args.device == "cuda":
        torch.cuda.synchronize()
    out["seconds"] = time.perf_counter() - t0
    out["peak_mib"] = _peak_mib(args.device)
    return out


def spawn(args: argparse.Namespace, *extra: str) -> dict:
    options = ["--n", str(args.n), "--d", str(args.d), "--device", args.device, *extra]
    if args.device == "cuda":
        sub = build_parser().parse_args(options)
        if sub.worker == "baseline":
            sub.worker = "none"
        result = measure(sub)
        torch.cuda.empty_cache()
        return result
    cmd = [sys.executable, os.path.join(HERE, "bench_huge.py"), *options]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-exact", action="store_true", help="skip the full exact run (minutes on CPU)")
    parser.add_argument("--worker", choices=["baseline", "exact", "sampled", "batch"], default=None)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--m", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        if args.worker == "baseline":
            args.worker = "none"
        print(json.dumps(measure(args)))
        return

    n, d = args.n, args.d
    print(f"Machine: {machine()}\n")
    base = spawn(args, "--worker", "baseline")
    nd_mib = n * d * 4 / 2**20
    print(f"### Peak memory of one block, n = {n}, d = {d} (baseline: weight + grad = {base['peak_mib']:.0f} MiB)\n")
    rows = []
    for chunk in (128, 512, 2048):
        shards = max(1, n // (2 * chunk))
        r = spawn(args, "--worker", "exact", "--chunk", str(chunk), "--shards", str(shards))
        extra = r["peak_mib"] - base["peak_mib"]
        block = chunk * n * 4 / 2**20
        rows.append([chunk, f"{extra:.0f}", f"{block:.0f}", f"{(extra - 3 * nd_mib) / block:.1f}"])
    print(
        table(
            ["chunk rows", "extra peak MiB", "chunk·n·4 B (MiB)", "(extra − 3·n·d·4 B) / (chunk·n·4 B)"],
            rows,
        )
    )
    print(f"\nn·d·4 B = {nd_mib:.0f} MiB; the dense n² Gram alone would be {n * n * 4 / 2**30:.0f} GiB.\n")

    exact = None
    if not args.skip_exact:
        exact = spawn(args, "--worker", "exact")
        print(
            f"### Exact full-space MHE + gradient over all {n * (n - 1) // 2:,} pairs\n\n"
            f"value {exact['value']:.6f}, {exact['seconds']:.0f} s, extra peak "
            f"{exact['peak_mib'] - base['peak_mib']:.0f} MiB\n"
        )
    rows = []
    for label, extra in (
        ("random subset m = 1,000", ["--worker", "sampled", "--m", "1000"]),
        ("random subset m = 4,000", ["--worker", "sampled", "--m", "4000"]),
        ("10 × random subset m = 1,000", ["--worker", "sampled", "--m", "1000", "--draws", "10"]),
        ("classes of a batch of 512 labels", ["--worker", "batch", "--m", "512"]),
    ):
        r = spawn(args, *extra)
        err = "–" if exact is None else f"{abs(r['value'] - exact['value']) / abs(exact['value']):.2e}"
        se = r.get("stderr")
        se_txt = "–" if se is None or se != se else f"{se / abs(r['value']):.1e}"
        rows.append(
            [label, f"{r['value']:.6f}", err, se_txt, f"{r['seconds']:.2f}", f"{r['peak_mib'] - base['peak_mib']:.0f}"]
        )
    print("### Sampled estimate (seed 0) vs the exact value\n")
    print(table(["estimate", "value", "relative error", "stated rel. std. error", "seconds", "extra peak MiB"], rows))


if __name__ == "__main__":
    main()
