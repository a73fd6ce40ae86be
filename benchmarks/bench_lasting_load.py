"""A load that lasts, and its end: the product chooser's all-thread probes in a load minutes old.

`bench_contention.py` switches its competing process on and off within each round and
`bench_busy_from_start.py` starts a fresh chooser every window, so neither sees a load older than a few
seconds. A job next to a busy data loader or another job sees one that lasts. Here the competing process
(`_contention.BusyCore`, pinned to one core) spins for ``--load-seconds``; blocks of ``--block-seconds`` rotate
between the arms, each with its own chooser kept for the whole run (`bench_contention.set_mode`) on a clock that
runs only in the arm's own blocks (`_arms.Arm`), so that its probe periods and the load's age are in the arm's own
time (with three arms rotating, a load of 240 s is about 80 s old in each arm's time):

- **1 thread**: ``torch.set_num_threads(1)``;
- **shipped**: the default threads, the chooser as shipped (under a load the all-thread probes come less often
  as the load lasts, item 65);
- **the arm against**, ``--against`` (a `bench_contention.MODES` mode): by default **without the runnable-task
  hint**, the chooser by its products' times alone (``RUNNABLE_HINT = False``, before item 67); item 65's runs
  took **probes every 0.5 s under a load** (``PROBE_ALL_GROWTH_SECONDS = None``, before item 65);
- **all-thread products**: every product on all threads, the reference once the load has ended (not run under it).

The table has the load's blocks from ``--skip-seconds`` on (of wall time) and, after the competing process stops,
the ``--after-seconds`` that follow in blocks of ``--after-block-seconds``: what an end seen late costs. Ratios are
per round of blocks (median and 95% bootstrap interval, `_common.paired_ratio`); "under a load" is the share of an
arm's calls made while its chooser held one, "load seen ending" the arm's own time from the competing process's
stop to the end of its first block without one, and "age" the load's age in the arm's time when it stopped.

Usage: ``python benchmarks/bench_lasting_load.py [--cases mhe,mgd,mhs] [--load-seconds 240] [--skip-seconds 60]
[--against "without the runnable-task hint"]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _arms import Arm, rotated
from _common import machine, ms, paired_ratio, table
from _contention import BusyCore
from bench_busy_from_start import CASES, case_call, cases_of
from bench_contention import MODES, set_mode

#: the arms but the one against (`--against`): arm → (`bench_contention.MODES` mode, one thread)
ARMS = {
    "1 thread": ("shipped", True),
    "shipped": ("shipped", False),
    "all-thread products": ("all-thread products", False),
}
_Blocks = dict[str, list[float]]


def _blocks(
    call: Callable[[], None],
    arms: list[Arm],
    threads: int,
    seconds: float,
    block: float,
    under_load: dict[str, list[bool]],
    seen_end: dict[str, float] | None = None,
    stopped: dict[str, float] | None = None,
) -> _Blocks:
    """Rounds of one ``block``-second block per arm (rotating the order) for ``seconds``; seconds per call per
    block. With ``seen_end``, for each arm in ``stopped`` (the choosing ones), its own time from its ``stopped`` time
    to the end of its first block without a load."""
    walls: _Blocks = {arm.name: [] for arm in arms}
    end, r = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        for arm in rotated(arms, r):
            walls[arm.name].append(arm.block(call, block, threads, under_load[arm.name]))
            watching = seen_end is not None and stopped is not None and arm.name in stopped
            if watching and arm.name not in seen_end and not arm.chooser.loaded:
                seen_end[arm.name] = arm.clock() - stopped[arm.name]
        r += 1
    set_mode("shipped")
    torch.set_num_threads(threads)
    return walls


def _rows(
    label: str, walls: _Blocks, under_load: dict[str, list[bool]], base: str, extra: dict[str, str], choosing: list[str]
):
    rows = []
    for arm in walls:
        median, low, high = paired_ratio(walls[arm], walls[base])
        ratio = "–" if arm == base else f"{median:.3f} [{low:.3f}, {high:.3f}]"
        loaded = under_load[arm]
        share = f"{sum(loaded) / len(loaded):.0%}" if loaded and arm in choosing else "–"
        rows.append([label, arm, ms(statistics.median(walls[arm])), ratio, share, extra.get(arm, "–")])
    return rows


def run_case(name: str, args: argparse.Namespace, threads: int) -> list[list[object]]:
    call, n, d = case_call(name)
    specs = {**ARMS, args.against: (args.against, False)}
    arms = {arm: Arm(arm, *spec) for arm, spec in specs.items()}
    choosing = ["shipped", args.against]
    during = [arm for arm in arms.values() if arm.name != "all-thread products"]
    under_load: dict[str, list[bool]] = {arm: [] for arm in arms}
    with BusyCore(args.core) as busy:
        busy.on()
        _blocks(call, during, threads, args.skip_seconds, args.block_seconds, {arm: [] for arm in arms})
        loaded = _blocks(call, during, threads, args.load_seconds - args.skip_seconds, args.block_seconds, under_load)
        busy.off()
        stopped = {arm: arms[arm].clock() for arm in choosing}
        ages = {arm: arms[arm].chooser.load_age() for arm in choosing}
        after_load: dict[str, list[bool]] = {arm: [] for arm in arms}
        seen_end: dict[str, float] = {}
        freed = _blocks(
            call,
            list(arms.values()),
            threads,
            args.after_seconds,
            args.after_block_seconds,
            after_load,
            seen_end,
            stopped,
        )
    head = f"{name} half {n} × {d}"
    ends = {arm: f"{seconds:.2f} s (age {ages[arm]:.0f} s)" for arm, seconds in seen_end.items()}
    ends.update({arm: f"not seen (age {ages[arm]:.0f} s)" for arm in choosing if arm not in seen_end})
    old = f"{head}, load {args.skip_seconds:.0f}-{args.load_seconds:.0f} s of wall time"
    rows = _rows(old, loaded, under_load, "1 thread", {}, choosing)
    median, low, high = paired_ratio(loaded["shipped"], loaded[args.against])
    rows.append([head, f"shipped / {args.against}", "–", f"{median:.3f} [{low:.3f}, {high:.3f}]", "–", "–"])
    after = f"{head}, the {args.after_seconds:.0f} s after"
    rows += _rows(after, freed, after_load, "all-thread products", ends, choosing)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="mhe,mgd,mhs", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--load-seconds", type=float, default=240.0, help="how long the competing process spins")
    parser.add_argument("--skip-seconds", type=float, default=60.0, help="the load's first seconds, not in the table")
    parser.add_argument("--block-seconds", type=float, default=1.0)
    parser.add_argument("--after-seconds", type=float, default=24.0, help="timed after the competing process stops")
    parser.add_argument("--after-block-seconds", type=float, default=0.25)
    parser.add_argument("--core", type=int, default=0, help="the core the competing process is pinned to")
    parser.add_argument(
        "--against",
        default="without the runnable-task hint",
        help=f"the chooser arm set against shipped, of {list(MODES)}",
    )
    args = parser.parse_args()
    cases = cases_of(parser, args.cases)
    if args.against not in MODES or args.against in ("shipped", "all-thread products"):
        parser.error(f"--against: choose a chooser mode other than shipped of {list(MODES)}, got {args.against!r}")
    if not 0 <= args.skip_seconds < args.load_seconds:
        parser.error("--skip-seconds must be at least 0 and less than --load-seconds")
    threads = torch.get_num_threads()
    print(f"Machine: {machine()}; competing process pinned to core {args.core}")
    started = time.perf_counter()
    rows: list[list[object]] = []
    for case in cases:
        rows += run_case(case, args, threads)
    header = ["case", "arm", "ms per call", "ratio, median [95%]", "under a load", "load seen ending"]
    print("\nRatios: during the load against 1 thread, after it against all-thread products.\n")
    print(table(header, rows))
    print(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
