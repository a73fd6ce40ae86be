"""An all-thread product after a stretch without one: the cost of a probe, cold and warm.

While the product chooser holds a load (`lightning_hsu.functional._product_threads`), every class runs
on one thread and one all-thread probe runs every half second. Such a probe follows hundreds of
milliseconds in which the second core did nothing for this process. This script times a product on
all threads right after such a gap (a sleep, a Python loop, one-thread Torch work with the pool
narrowed by `passes_on_one_thread`, as the pair sums narrow it), the product after it, and the same
product back to back (warm), against one thread. Where the first product after a gap loses to one thread while the warm
one wins, a single probe cannot see an idle machine: the chooser keeps a load that has ended.

Usage: ``python benchmarks/bench_cold_start.py [--gap-ms 200] [--repeats 9]`` (two threads: the
caller's, or ``--threads``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import add_common_args, apply_threads, machine, ms, table

from lightning_hsu.functional._matmul import passes_on_one_thread

#: products of the sizes of hard MHS's Gram strips at 1024 x 512 (size classes 2^24 to 2^26)
SHAPES = ((128, 512, 256), (128, 512, 512), (128, 512, 1024))


def python_loop(milliseconds: float) -> None:
    start = time.perf_counter()
    while ms(time.perf_counter() - start) < milliseconds:
        pass


def narrowed_torch_work(milliseconds: float, scratch: torch.Tensor) -> None:
    """One-thread Torch passes inside the pair sums' own narrowing of the pool (`passes_on_one_thread`)."""
    with passes_on_one_thread(scratch.device):
        start = time.perf_counter()
        while ms(time.perf_counter() - start) < milliseconds:
            scratch.mul_(1.0000001)


def timed(product: Callable[[], object]) -> float:
    start = time.perf_counter()
    product()
    return ms(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--gap-ms", type=float, default=200.0, help="the stretch before each cold product")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    apply_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"Machine: {machine()}; gap {args.gap_ms:g} ms, {args.repeats} repeats, medians in ms\n")
    scratch = torch.randn(1 << 20)
    gaps: dict[str, Callable[[], None]] = {
        "sleep": lambda: time.sleep(args.gap_ms / 1e3),
        "Python loop": lambda: python_loop(args.gap_ms),
        "one-thread Torch work": lambda: narrowed_torch_work(args.gap_ms, scratch),
    }
    rows = []
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)

        def product(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            torch.mm(a, b)

        for _ in range(20):
            product()
        warm = statistics.median(timed(product) for _ in range(3 * args.repeats))
        torch.set_num_threads(1)
        one = statistics.median(timed(product) for _ in range(3 * args.repeats))
        torch.set_num_threads(threads)
        for name, gap in gaps.items():
            first, second = [], []
            for _ in range(args.repeats):
                gap()
                first.append(timed(product))
                second.append(timed(product))
            cold, after = statistics.median(first), statistics.median(second)
            rows.append([f"{m} x {k} x {n}", name, cold, after, warm, one, cold / one, warm / one])
    header = ["product", "gap", "first after the gap", "second", "warm", "one thread", "first / one", "warm / one"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
