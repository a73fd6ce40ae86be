"""A core busy from the first call: the penalty as a job started on a busy machine sees it.

`bench_contention.py` switches its competing process on and off within each round, so every
chooser there has seen the machine idle before the load comes. Here the competing process
(`_contention.BusyCore`, pinned to one core) spins for the whole run, and each timed window of
``--seconds`` starts with a fresh product chooser (`lightning_hsu.functional._product_threads`),
as a new process would. Arms, rotated within each round so that they share the host's minute:

- **1 thread**: ``torch.set_num_threads(1)``;
- **shipped**: the default threads, the chooser as shipped;
- **before item 59**: the same without a load marked from the start
  (``_product_threads.LOAD_FROM_THE_START_SECONDS = None``): a load is marked only when a class
  that won clearly on all threads moves to one, which never happens on a core busy from the start,
  so the compiled kernel's calls keep all threads.

Reports ms per call (the window's mean after two untimed calls), two threads / one per round (median
and 95% bootstrap interval, `_common.paired_ratio`), the arm before item 59 against the shipped one
the same way, and in how many windows a load was marked by their end.

Usage: ``python benchmarks/bench_busy_from_start.py [--cases mhe,mgd] [--rounds 16] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import machine, ms, names_of, paired_ratio, table
from _contention import BusyCore

from lightning_hsu.functional import (
    _product_threads,
    gram_determinant_penalty,
    hyperspherical_energy,
    hyperspherical_separation,
)

#: case → (penalty in half space, n, d)
CASES: dict[str, tuple[Callable[..., torch.Tensor], int, int]] = {
    "mhe": (hyperspherical_energy, 512, 4608),
    "mgd": (gram_determinant_penalty, 1024, 512),
    "mhs": (hyperspherical_separation, 1024, 512),
}
#: arm → (threads: 1 or the default, `_product_threads.LOAD_FROM_THE_START_SECONDS`)
ARMS = {
    "1 thread": (1, _product_threads.LOAD_FROM_THE_START_SECONDS),
    "shipped": (0, _product_threads.LOAD_FROM_THE_START_SECONDS),
    "before item 59": (0, None),
}


def case_call(name: str) -> tuple[Callable[[], None], int, int]:
    """One call of case ``name``'s penalty, forward and backward, on seeded weights; and its n and d."""
    fn, n, d = CASES[name]
    torch.manual_seed(0)
    w = torch.randn(n, d, requires_grad=True)

    def call() -> None:
        w.grad = None
        fn(w, half_space=True).backward()

    return call, n, d


def cases_of(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The case names of a comma-separated ``--cases``, or the parser's error naming the unknown ones."""
    return names_of(parser, "--cases", text, sorted(CASES))


def run_case(name: str, rounds: int, seconds: float, threads: int) -> list[list[object]]:
    call, n, d = case_call(name)
    walls: dict[str, list[float]] = {arm: [] for arm in ARMS}
    marked = dict.fromkeys(ARMS, 0)
    arms = list(ARMS)
    for r in range(rounds):
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
            arm_threads, from_the_start = ARMS[arm]
            _product_threads.LOAD_FROM_THE_START_SECONDS = from_the_start
            _product_threads.CHOOSER = _product_threads.ProductThreadChooser()  # a new job's chooser
            torch.set_num_threads(arm_threads or threads)
            call()
            call()
            start, calls = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                call()
                calls += 1
            walls[arm].append((time.perf_counter() - start) / calls)
            marked[arm] += _product_threads.CHOOSER.loaded
    rows: list[list[object]] = []
    for arm in arms:
        median, low, high = paired_ratio(walls[arm], walls["1 thread"])
        interval = "–" if arm == "1 thread" else f"{median:.2f} [{low:.2f}, {high:.2f}]"
        wall = ms(statistics.median(walls[arm]))
        rows.append([f"{name} half {n} × {d}", arm, wall, interval, f"{marked[arm]}/{rounds}"])
    median, low, high = paired_ratio(walls["before item 59"], walls["shipped"])
    paired = f"{median:.2f} [{low:.2f}, {high:.2f}]"
    rows.append([f"{name} half {n} × {d}", "before item 59 / shipped", "–", paired, "–"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="mhe,mgd", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed window per arm and round")
    parser.add_argument("--core", type=int, default=0, help="the core the competing process is pinned to")
    args = parser.parse_args()
    cases = cases_of(parser, args.cases)
    threads = torch.get_num_threads()
    print(f"Machine: {machine()}; competing process pinned to core {args.core} for the whole run")
    rows: list[list[object]] = []
    started = time.perf_counter()
    with BusyCore(args.core) as busy:
        busy.on()
        for case in cases:
            rows += run_case(case, args.rounds, args.seconds, threads)
        busy.off()
    header = ["case", "arm", "ms per call", "two threads / one, median [95%]", "load marked by the end"]
    print()
    print(table(header, rows))
    print(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
