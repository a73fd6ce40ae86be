"""An all-thread product after a stretch without one: the cost of a probe, cold and warm.

While the product chooser holds a load (`lightning_hsu.functional._product_threads`), every class runs
on one thread and one all-thread probe runs every half second. Such a probe follows hundreds of
milliseconds in which the second core did nothing for this process. This script times a product on
all threads right after such a gap (a sleep, a Python loop, one-thread Torch work with the pool
narrowed by `passes_on_one_thread`, as the pair sums narrow it), the product after it, and the same
product back to back (warm), against one thread. Where the first product after a gap loses to one thread while the warm
one wins, a single probe cannot see an idle machine: the chooser keeps a load that has ended. Two more tables say
how long a gap makes a product slow and how long products after one take to come up to speed; since item 61 a
probe under a load is a burst whose first `_product_threads.PROBE_WARM_UP_SECONDS` are not measured.

``--chooser CASES`` then measures the chooser on the idle machine: per case (``kind:n x d``, kinds ``mhe``,
``mhs``, ``mgd``: half space, forward + backward), blocks of ``--block-seconds`` of back-to-back calls rotate
between five arms, each with its own product chooser kept from block to block, on a clock that runs only in the
arm's own blocks (`_arms.Arm`; before item 65's session the choosers read the wall clock, so their probe periods
ran during the other arms' blocks too):

- **shipped**;
- **loads from short products**: a clear winner of any length marks a load when it moves to one thread
  (``LOAD_EVIDENCE_SECONDS = None``, before item 63);
- **one-thread probes every 2 s**: each class that keeps all threads re-measures one thread every
  ``PROBE_ONE_SECONDS``, however much that costs (``PROBE_ONE_SHARE = None``, before item 62);
- **chooser before item 61** (and 62, 63): under a load each all-thread probe is one product, measured however long
  the second core was quiet (``PROBE_WARM_UP_SECONDS = None``), and a load is marked on a class's latest
  all-thread product, not their median (``LOAD_FROM_MEDIAN = False``);
- **all-thread products**: every product on all threads (``LIGHTNING_HSU_PRODUCT_THREADS=all``).

The arms are `bench_contention.py`'s modes of the same names.

It prints the paired ratios of the blocks' ms per call against all threads and the share of calls made while each
chooser held a load.

Usage: ``python benchmarks/bench_cold_start.py [--gap-ms 200] [--repeats 9] [--chooser
mhe:512x4608,mhs:1024x512 --blocks 20 --block-seconds 1]`` (two threads: the caller's, or ``--threads``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable

import torch
from _arms import Arm, rotated
from _common import add_common_args, apply_threads, machine, ms, paired_ratio, table
from bench_contention import set_mode

from lightning_hsu.functional import (
    _product_threads,
    gram_determinant_penalty,
    hyperspherical_energy,
    hyperspherical_separation,
)
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


PENALTIES = {"mhe": hyperspherical_energy, "mhs": hyperspherical_separation, "mgd": gram_determinant_penalty}
#: the arms of ``--chooser`` (`bench_contention.MODES`); the last is the reference, every product on all threads
ARMS = (
    "shipped",
    "loads from short products",
    "one-thread probes every 2 s",
    "chooser before item 61",
    "all-thread products",
)


def chooser_idle(case: str, blocks: int, block_seconds: float) -> list[list[object]]:
    """The rows of one ``--chooser`` case: each arm against every product on all threads, and its load share."""
    kind, shape = case.split(":")
    n, d = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, d, requires_grad=True)
    penalty = PENALTIES[kind]

    def call() -> None:
        w.grad = None
        penalty(w, half_space=True).backward()

    arms = [Arm(name, name) for name in ARMS]
    per_call: dict[str, list[float]] = {arm: [] for arm in ARMS}
    loaded: dict[str, list[bool]] = {arm: [] for arm in ARMS}
    threads = torch.get_num_threads()
    for arm in arms:
        arm.block(call, block_seconds, threads, [])
    for rnd in range(blocks):
        for arm in rotated(arms, rnd):
            per_call[arm.name].append(ms(arm.block(call, block_seconds, threads, loaded[arm.name])))
    set_mode("shipped")
    reference = ARMS[-1]
    rows = []
    for arm in ARMS[:-1]:
        median, low, high = paired_ratio(per_call[arm], per_call[reference])
        share = sum(loaded[arm]) / len(loaded[arm])
        rows.append(
            [
                f"{kind} {n} x {d}",
                arm,
                statistics.median(per_call[arm]),
                statistics.median(per_call[reference]),
                f"{median:.3f} [{low:.3f}, {high:.3f}]",
                f"{100 * share:.0f}%",
            ]
        )
    return rows


GAP_HEADER = ["product", "gap", "first after the gap", "second", "warm", "one thread", "first / one", "warm / one"]


def _one_and_all(product: Callable[[], object], repeats: int, threads: int) -> tuple[float, float]:
    """Warm medians (ms) of ``product`` on one thread and on ``threads``."""
    for _ in range(20):
        product()
    warm = statistics.median(timed(product) for _ in range(3 * repeats))
    torch.set_num_threads(1)
    one = statistics.median(timed(product) for _ in range(3 * repeats))
    torch.set_num_threads(threads)
    return one, warm


def gap_rows(gap_ms: float, repeats: int, threads: int) -> list[list[object]]:
    """The first and second product after each kind of gap, against warm and one thread."""
    scratch = torch.randn(1 << 20)
    gaps: dict[str, Callable[[], None]] = {
        "sleep": lambda: time.sleep(gap_ms / 1e3),
        "Python loop": lambda: python_loop(gap_ms),
        "one-thread Torch work": lambda: narrowed_torch_work(gap_ms, scratch),
    }
    rows: list[list[object]] = []
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)

        def product(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            torch.mm(a, b)

        one, warm = _one_and_all(product, repeats, threads)
        for name, gap in gaps.items():
            first, second = [], []
            for _ in range(repeats):
                gap()
                first.append(timed(product))
                second.append(timed(product))
            cold, after = statistics.median(first), statistics.median(second)
            rows.append([f"{m} x {k} x {n}", name, cold, after, warm, one, cold / one, warm / one])
    return rows


def _middle_product() -> Callable[[], object]:
    a, b = torch.randn(128, 512), torch.randn(512, 512)
    return lambda: torch.mm(a, b)


def gap_length_rows(repeats: int, threads: int) -> list[list[object]]:
    """How long a stretch of one-thread work makes the next all-thread product slow (the chooser's probe burst
    rests on it)."""
    product, scratch = _middle_product(), torch.randn(1 << 16)
    one, warm = _one_and_all(product, repeats, threads)
    rows: list[list[object]] = [["none (warm)", warm / one]]
    for gap in (0.3, 1.0, 3.0, 10.0, 30.0, 100.0):
        firsts = []
        for _ in range(repeats):
            for _ in range(10):  # a warm pool: products 0.2 ms apart
                product()
                narrowed_torch_work(0.2, scratch)
            narrowed_torch_work(gap, scratch)
            firsts.append(timed(product))
        rows.append([f"{gap:g}", statistics.median(firsts) / one])
    return rows


def warm_up_rows(gap_ms: float, repeats: int, threads: int) -> list[list[object]]:
    """Products after a quiet stretch, as inside a pair sum (0.2 ms of one-thread passes between): how long
    the second core takes to come up to speed (what the chooser's probe warm-up rests on)."""
    product, scratch = _middle_product(), torch.randn(1 << 16)
    one, _ = _one_and_all(product, repeats, threads)
    count = 8
    times: list[list[float]] = [[] for _ in range(count)]
    starts: list[list[float]] = [[] for _ in range(count)]
    for _ in range(repeats):
        narrowed_torch_work(gap_ms, scratch)
        origin = time.perf_counter()
        for i in range(count):
            starts[i].append(ms(time.perf_counter() - origin))
            times[i].append(timed(product))
            narrowed_torch_work(0.2, scratch)
    return [[i + 1, statistics.median(starts[i]), statistics.median(times[i]) / one] for i in range(count)]


def chooser_microseconds(products: int = 20_000) -> float:
    """The chooser's own time per product (`use_all_threads` and `record`, four size classes), in us."""
    chooser = _product_threads.ProductThreadChooser()
    works = [2**23 + 5, 2**24 + 5, 2**25 + 5, 2**26 + 5]

    def one(i: int) -> None:
        work = works[i % len(works)]
        chooser.record(work, chooser.use_all_threads(work, "k"), 1e-3, "k", 0.8e-3)

    for i in range(1000):
        one(i)
    start = time.perf_counter()
    for i in range(products):
        one(i)
    return (time.perf_counter() - start) / products * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--gap-ms", type=float, default=200.0, help="the stretch before each cold product")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--chooser", default="", help="comma-separated kind:nxd cases, e.g. mhs:1024x512 ('' skips)")
    parser.add_argument("--blocks", type=int, default=20, help="blocks of each arm per --chooser case")
    parser.add_argument("--block-seconds", type=float, default=1.0)
    parser.add_argument("--skip-products", action="store_true", help="only the --chooser cases")
    args = parser.parse_args()
    cases = [c.strip() for c in args.chooser.split(",") if c.strip()]
    for case in cases:  # checked before the product measurements, which take minutes
        if not re.fullmatch(rf"({'|'.join(PENALTIES)}):[1-9][0-9]*x[1-9][0-9]*", case):
            parser.error(f"--chooser: {case!r} is not kind:nxd with kind one of {list(PENALTIES)}, e.g. mhs:1024x512")
    apply_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"Machine: {machine()}; gap {args.gap_ms:g} ms, {args.repeats} repeats, medians in ms\n")
    if not args.skip_products:
        print(table(GAP_HEADER, gap_rows(args.gap_ms, args.repeats, threads)))
        print("\nAfter one-thread Torch work of each length, 128 x 512 x 512 (10 products 0.2 ms apart before)\n")
        print(table(["gap (ms)", "first after the gap / one thread"], gap_length_rows(args.repeats, threads)))
        print(f"\nProducts 0.2 ms of one-thread work apart after a gap of {args.gap_ms:g} ms, 128 x 512 x 512\n")
        rows = warm_up_rows(args.gap_ms, args.repeats, threads)
        print(table(["product", "started after (ms)", "time / one thread"], rows))
    if cases:
        print(f"\nThe chooser's own time: {chooser_microseconds():.1f} us a product")
        print(f"\nThe chooser, idle: {args.blocks} blocks of {args.block_seconds:g} s per arm, rotating\n")
        rows = [row for case in cases for row in chooser_idle(case, args.blocks, args.block_seconds)]
        header = ["case", "arm", "ms per call", "all threads", "arm / all threads [95%]", "calls under a load"]
        print(table(header, rows))


if __name__ == "__main__":
    main()
