"""The pair sums with oneDNN's float32 products against ``torch.bmm`` (MKL), on this CPU.

The package picks the library by the CPU (``lightning_hsu.functional._matmul``: oneDNN on a CPU with
AVX-512 that is not Intel's, ``torch.bmm`` elsewhere; items 49 and 53 of ``docs/performance.md``).
This script checks that choice on the machine it runs on: each case (half space, forward + backward) is timed with
``LIGHTNING_HSU_ONEDNN_MATMUL=1`` and ``=0`` in alternating rounds of one process (the choice is read
again at each switch), and the per-round ratio oneDNN / MKL is reported with its 95% bootstrap
interval. Above 1, ``torch.bmm`` is the faster library here.

Usage: ``python benchmarks/bench_product_library.py [--threads 1] [--rounds 8] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _common import add_common_args, apply_threads, machine, ms, paired_ratio, table

from lightning_hsu.functional import (
    _matmul,
    compressive_energy,
    gram_determinant_penalty,
    hyperspherical_energy,
    hyperspherical_separation,
)

CASES = [
    ("mhe", 512, 4608),
    ("mhe", 256, 2304),
    ("mhe", 1024, 512),
    ("mhe", 2048, 512),
    ("mhs", 512, 4608),
    ("mhs", 1024, 512),
    ("mgd", 512, 4608),
    ("mgd", 1024, 512),
    ("comhe", 512, 4608),
    ("comhe", 1024, 512),
    ("comhe", 2048, 512),
]
QUICK = [("mhe", 512, 4608), ("mhe", 1024, 512), ("comhe", 1024, 512)]
LIBRARIES = {"oneDNN": "1", "MKL": "0"}


def penalty(kind: str, projections: torch.Tensor):
    if kind == "mhe":
        return lambda v: hyperspherical_energy(v, half_space=True)
    if kind == "mhs":
        return lambda v: hyperspherical_separation(v, half_space=True)
    if kind == "mgd":
        return lambda v: gram_determinant_penalty(v, half_space=True)
    return lambda v: compressive_energy(v, projections, half_space=True)


def use(library: str) -> None:
    os.environ[_matmul.ONEDNN_ENV] = LIBRARIES[library]
    _matmul._onednn_linear.cache_clear()


def time_case(kind: str, n: int, d: int, rounds: int, calls: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    w = torch.randn(n, d, requires_grad=True)
    fn = penalty(kind, torch.randn(20, 40, d))

    def step() -> None:
        w.grad = None
        fn(w).backward()

    for library in LIBRARIES:  # warm-up: the libraries' plans, the product chooser's classes
        use(library)
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {library: [] for library in LIBRARIES}
    for r in range(rounds):
        for library in list(LIBRARIES)[:: 1 if r % 2 else -1]:
            use(library)
            step()  # the first call after a switch is not timed
            start = time.perf_counter()
            for _ in range(calls):
                step()
            times[library].append((time.perf_counter() - start) / calls)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2, help="calls timed together per round and library")
    parser.add_argument("--quick", action="store_true", help="three cases, 4 rounds")
    args = parser.parse_args()
    if args.device != "cpu":
        parser.error("--device: the product library is a CPU choice")
    if _matmul.onednn_operator() is None:
        raise SystemExit("this PyTorch has no oneDNN float32 matmul: nothing to compare")
    apply_threads(args.threads)
    before = os.environ.get(_matmul.ONEDNN_ENV)
    avx512 = "with" if _matmul.cpu_has_avx512() else "without"
    print(f"Machine: {machine()}; CPU vendor {_matmul.cpu_vendor() or 'unknown'}, {avx512} AVX-512")
    print(f"The package's default here: {'oneDNN' if _matmul.onednn_matmul_enabled() else 'MKL (torch.bmm)'}\n")
    rounds = 4 if args.quick else args.rounds
    rows = []
    try:
        for kind, n, d in QUICK if args.quick else CASES:
            times = time_case(kind, n, d, rounds, args.calls)
            median, low, high = paired_ratio(times["oneDNN"], times["MKL"])
            rows.append(
                [
                    kind.upper(),
                    n,
                    d,
                    ms(statistics.median(times["oneDNN"])),
                    ms(statistics.median(times["MKL"])),
                    f"{median:.3g} [{low:.3g}, {high:.3g}]",
                ]
            )
            print(table(["regulariser", "n", "d", "oneDNN ms", "MKL ms", "oneDNN / MKL [95%]"], rows[-1:]), flush=True)
    finally:
        if before is None:
            os.environ.pop(_matmul.ONEDNN_ENV, None)
        else:
            os.environ[_matmul.ONEDNN_ENV] = before
        _matmul._onednn_linear.cache_clear()
    print("\n" + table(["regulariser", "n", "d", "oneDNN ms", "MKL ms", "oneDNN / MKL [95%]"], rows))


if __name__ == "__main__":
    main()
