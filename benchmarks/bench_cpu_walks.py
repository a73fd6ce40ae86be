"""The compiled C kernel's walks, vectorised as shipped against the scalar build, per kernel.

Items 52 and 54 of ``docs/performance_history.md``: built without ``-fno-trapping-math`` GCC kept the
walks' clamps as branches and divided one Gram entry at a time, and without glibc's vector math
library (libmvec) ``logf``, ``powf`` and ``expf`` ran one entry at a time. This script builds both
libraries (the scalar one as before those items, into a temporary cache) and times one call of
`lightning_hsu.functional._cpu_pairs.pair_block_sums` with the gradient on the same Gram block,
in alternating rounds of one process, per kernel and space. It prints nanoseconds per Gram entry
(the block's copy from a saved Gram matrix subtracted) and the paired ratio scalar / shipped with
its 95% bootstrap interval.

Usage: ``python benchmarks/bench_cpu_walks.py [--threads 1] [--rounds 8]``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from _common import add_common_args, apply_threads, machine, paired_ratio, table

from lightning_hsu.functional import _cpu_pairs
from lightning_hsu.functional.kernels import GaussianKernel, PairKernel, RieszKernel

KERNELS: list[tuple[str, PairKernel]] = [
    ("Riesz s = 2 (MHE)", RieszKernel(2.0)),
    ("Riesz s = 1", RieszKernel(1.0)),
    ("log (s = 0)", RieszKernel(0.0)),
    ("Riesz s = 3", RieszKernel(3.0)),
    ("Gaussian t = 2 (uniformity)", GaussianKernel(2.0)),
]
#: Layers of CoMHE's size: 4 blocks of 1024 x 1024 Gram entries of 40-dimensional rows.
BATCH, N, DIM = 4, 1024, 40


def build(scalar: bool) -> ctypes.CDLL:
    """The kernel's library as shipped, or as before items 52 and 54 (``scalar``), in a temporary cache."""
    saved = _cpu_pairs.FLAGS, _cpu_pairs.VECTOR_MATH, os.environ.get(_cpu_pairs.CACHE_ENV)
    with tempfile.TemporaryDirectory() as cache:
        os.environ[_cpu_pairs.CACHE_ENV] = cache
        if scalar:
            _cpu_pairs.FLAGS = tuple(flag for flag in _cpu_pairs.FLAGS if flag != "-fno-trapping-math")
            _cpu_pairs.VECTOR_MATH = ()
        try:
            return _cpu_pairs._library.__wrapped__()  # loaded before the directory goes
        finally:
            _cpu_pairs.FLAGS, _cpu_pairs.VECTOR_MATH = saved[:2]
            if saved[2] is None:
                os.environ.pop(_cpu_pairs.CACHE_ENV, None)
            else:
                os.environ[_cpu_pairs.CACHE_ENV] = saved[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.device != "cpu":
        parser.error("--device: the C kernel runs on the CPU")
    if _cpu_pairs._compiler() is None:
        raise SystemExit("no C compiler: the package runs the eager passes here")
    apply_threads(args.threads)
    libraries = {"scalar": build(scalar=True), "shipped": build(scalar=False)}
    print(f"Machine: {machine()}; {BATCH} blocks of {N} x {N} Gram entries of {DIM}-dimensional rows\n")

    torch.manual_seed(0)
    rows_ = torch.nn.functional.normalize(torch.randn(BATCH, N, DIM), dim=2)
    saved = torch.bmm(rows_, rows_.transpose(1, 2))
    block = saved.clone()
    sq = torch.ones(BATCH, N)
    entries = BATCH * N * N
    original = _cpu_pairs._library
    rows = []
    try:
        for name, kernel in KERNELS:
            for half in (False, True):
                calls: dict[str, Callable[[], None]] = {}
                for variant, library in libraries.items():

                    def call(library: ctypes.CDLL = library, kernel: PairKernel = kernel, half: bool = half) -> None:
                        _cpu_pairs._library = lambda: library  # type: ignore[assignment]
                        block.copy_(saved)
                        _cpu_pairs.pair_block_sums(block, 0, kernel, half_space=half, sq=sq, with_grad=True)

                    calls[variant] = call

                def copy() -> None:
                    block.copy_(saved)

                calls["copy"] = copy
                times: dict[str, list[float]] = {variant: [] for variant in calls}
                for _ in range(2):  # warm-up
                    for fn in calls.values():
                        fn()
                for r in range(args.rounds):
                    for variant in list(calls)[:: 1 if r % 2 else -1]:
                        start = time.perf_counter()
                        calls[variant]()
                        times[variant].append(time.perf_counter() - start)
                copy_s = statistics.median(times["copy"])
                per_entry = {v: [max(t - copy_s, 1e-9) for t in times[v]] for v in ("scalar", "shipped")}
                median, low, high = paired_ratio(per_entry["scalar"], per_entry["shipped"])
                rows.append(
                    [
                        name,
                        "half" if half else "full",
                        f"{1e9 * statistics.median(per_entry['scalar']) / entries:.2f}",
                        f"{1e9 * statistics.median(per_entry['shipped']) / entries:.2f}",
                        f"{median:.3g} [{low:.3g}, {high:.3g}]",
                    ]
                )
                print(rows[-1], flush=True)
    finally:
        _cpu_pairs._library = original  # type: ignore[assignment]
    header = ["kernel", "space", "scalar ns / entry", "shipped ns / entry", "scalar / shipped [95%]"]
    print("\n" + table(header, rows))


if __name__ == "__main__":
    main()
