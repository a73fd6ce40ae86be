"""The Gram matrix's mirroring: ATen's copy of a transposed view against the compiled tiles.

Item 56 of ``docs/performance_history.md``: `lightning_hsu.functional._matmul.gram` computes the
upper strips of 128 rows and mirrors each strip below the diagonal. ATen's copy of the transposed
strip walks one side a row apart; on matrices whose rows are a multiple of 4 KiB long (1024 or 2048
float32 columns) the destination rows share a set of the first-level cache. The package now
mirrors through `lightning_hsu.functional._cpu_pairs.mirror_block` (32 x 32 tiles through a buffer).

This script times the mirroring of every strip of one ``[1, n, n]`` matrix, both ways, in
alternating rounds of one process, per size and dtype (1000 rows: a size without the cache
conflict, for comparison). It prints milliseconds per matrix and the paired ratio ATen / tiles
with its 95% bootstrap interval, and the full `gram` (products and mirror) for scale.

Usage: ``python benchmarks/bench_gram_mirror.py [--threads 1] [--rounds 12]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import add_common_args, apply_threads, machine, paired_ratio, table

from lightning_hsu.functional import _cpu_pairs
from lightning_hsu.functional._matmul import GRAM_STRIP_ROWS, gram

SIZES = (1000, 1024, 2048)
DIM = 512


def aten_mirror(out: torch.Tensor) -> None:
    """The mirroring as before item 56: each strip's block right of its diagonal tile, copied transposed."""
    n = out.shape[1]
    for start in range(0, n, GRAM_STRIP_ROWS):
        stop = min(start + GRAM_STRIP_ROWS, n)
        out[:, stop:, start:stop] = out[:, start:stop, stop:].transpose(1, 2)


def tiled_mirror(out: torch.Tensor) -> None:
    """The mirroring as `gram` does it now: each strip, its diagonal tile included, in the library's tiles."""
    n = out.shape[1]
    for start in range(0, n, GRAM_STRIP_ROWS):
        _cpu_pairs.mirror_block(out, (start, min(start + GRAM_STRIP_ROWS, n)), (start, n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    if args.device != "cpu":
        parser.error("--device: the mirroring in tiles runs on the CPU")
    if not _cpu_pairs.ready():
        raise SystemExit("the compiled library is unavailable: gram mirrors through ATen here")
    apply_threads(args.threads)
    print(f"Machine: {machine()}; strips of {GRAM_STRIP_ROWS} rows, rows of {DIM} entries\n")
    rows = []
    for dtype in (torch.float32, torch.float64):
        for n in SIZES:
            x = torch.randn(1, n, DIM, dtype=dtype)
            matrix = gram(x, mirror=False)
            calls: dict[str, Callable[[], None]] = {
                "aten": lambda m=matrix: aten_mirror(m),
                "tiles": lambda m=matrix: tiled_mirror(m),
                "gram": lambda x=x: gram(x),
            }
            times: dict[str, list[float]] = {name: [] for name in calls}
            for fn in calls.values():  # warm-up
                fn()
            for r in range(args.rounds):
                for name in list(calls)[:: 1 if r % 2 else -1]:
                    start = time.perf_counter()
                    calls[name]()
                    times[name].append(time.perf_counter() - start)
            median, low, high = paired_ratio(times["aten"], times["tiles"])
            rows.append(
                [
                    str(dtype).removeprefix("torch."),
                    n,
                    f"{1e3 * statistics.median(times['aten']):.2f}",
                    f"{1e3 * statistics.median(times['tiles']):.2f}",
                    f"{median:.3g} [{low:.3g}, {high:.3g}]",
                    f"{1e3 * statistics.median(times['gram']):.2f}",
                ]
            )
            print(rows[-1], flush=True)
    header = ["dtype", "n", "ATen mirror ms", "tiled mirror ms", "ATen / tiles [95%]", "whole gram ms (now)"]
    print("\n" + table(header, rows))


if __name__ == "__main__":
    main()
