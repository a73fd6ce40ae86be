r"""How many intra-op threads a pair sum's matrix product gets on the CPU: all, or one, measured online.

Inside `_matmul.passes_on_one_thread` the elementwise passes run on one thread and each product
used to widen the pool to the caller's threads. That is the faster choice on an idle machine
(about 1.8x on two cores), but the product library splits a product statically between its
threads, so when another process holds one of the cores the product waits for the descheduled
share and takes longer than on one thread (1.04-1.56x the one-thread time, measured in
``docs/performance.md``). Which case holds changes while a job runs (data-loader workers, other
jobs on a shared host), so it is measured, not configured:

- products are grouped by size class, \(\lfloor\log_2(\text{multiply-adds})\rfloor\);
- per class, each choice keeps its latest `WINDOW` measurements of seconds per multiply-add
  (the first product takes all threads, the next two one thread);
- a class uses the choice with the lower median (a descheduled time slice makes a single product
  several times slower: one such product must not decide);
- while all threads win, each class re-measures one thread every `PROBE_ONE_SECONDS` (the
  one-thread time barely moves with load), and at once after an all-thread product
  `SLOWDOWN` times slower than the median (a new load shows in the all-thread products
  themselves: two slow ones move the class to one thread, if one thread is faster now);
- while one thread wins, one all-thread probe runs every `PROBE_ALL_SECONDS`, for all such
  classes together: the load is the machine's, and each probe costs more than its own product
  (after an all-thread product the pool's idle thread spins for a while on a core the next
  one-thread work needs). A probe that beats the winner is repeated at the next product; when
  two all-thread probes in a row win a class back (one may be a lucky time slice), every class
  on one thread re-measures at its next product, so the machine freeing up is followed within
  about `PROBE_ALL_SECONDS`;
- each product's time runs to the start of the next product (or the end of the pair sum), so
  that the slowdown of the passes after an all-thread product is charged to it;
- where the operating system accounts CPU time per core (Linux's ``/proc/stat``), `CoreLoad`
  tells whether other processes use the cores this process's threads need. While it says so, the
  all-thread probes come every `PROBE_ALL_CONTENDED_SECONDS` instead: an isolated probe is
  optimistic (the scheduler runs a thread that has slept before the competitor, so a lone
  all-thread product may have both cores while a run of them would not), and its win-backs made
  the choice flap. A change of that report re-measures the losing choice of every class at once,
  so the end of a load is followed at the next product.

What it costs on an idle machine: one product per class every `PROBE_ONE_SECONDS` on one thread,
and a read of ``/proc/stat`` every `LOAD_WINDOW_SECONDS` at most; on a busy core, one all-thread
product every `PROBE_ALL_CONTENDED_SECONDS` (every `PROBE_ALL_SECONDS` without the report).
The result does not depend on the choice where the product library splits rows and columns only
(oneDNN and MKL on the shapes of ``tests/functional/test_product_threads.py``: bit-identical); with
``torch.use_deterministic_algorithms(True)`` every product takes the caller's threads, as does
everything when the environment variable ``LIGHTNING_HSU_PRODUCT_THREADS=all`` is set.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

#: Environment variable choosing the products' threads: ``adaptive`` (the default) or ``all``.
PRODUCT_THREADS_ENV = "LIGHTNING_HSU_PRODUCT_THREADS"
PRODUCT_THREADS_CHOICES = ("adaptive", "all")
#: Measurements kept per choice and size class; the choices compare their medians.
WINDOW = 3
#: An all-thread product this much slower than its class's median re-measures one thread next.
SLOWDOWN = 1.5
#: All threads win a class back from one thread only when this much faster (a fraction): under load
#: the two are often within a few per cent for large products, and a tie flipped the choice back and forth.
WIN_BACK_MARGIN = 0.1
#: While all threads win in a size class, one of its products runs on one thread this often (s).
PROBE_ONE_SECONDS = 2.0
#: While one thread wins, one product (of any such class) runs on all threads this often (s).
PROBE_ALL_SECONDS = 0.5
#: The same while the operating system reports another process on this process's cores (s): the
#: load is known to last, and an isolated probe is optimistic (a thread that has slept gets the shared core first).
PROBE_ALL_CONTENDED_SECONDS = 5.0
#: Shortest window over which `CoreLoad` measures the other processes' CPU time (s).
LOAD_WINDOW_SECONDS = 0.15
#: Cores' worth of other processes' CPU time, beyond the cores this process's threads leave free,
#: above which the cores count as contended; below it less `LOAD_HYSTERESIS`, as free again.
LOAD_THRESHOLD = 0.5
LOAD_HYSTERESIS = 0.25


def product_threads_mode() -> str:
    """``"adaptive"`` or ``"all"``, from `PRODUCT_THREADS_ENV`; a clear error for anything else."""
    value = os.environ.get(PRODUCT_THREADS_ENV, "adaptive").strip().lower()
    if value not in PRODUCT_THREADS_CHOICES:
        raise ValueError(f"{PRODUCT_THREADS_ENV}={value!r}: choose one of {', '.join(PRODUCT_THREADS_CHOICES)}")
    return value


def _read_proc_stat() -> dict[int, tuple[int, int]] | None:
    """Per CPU, ``(busy, total)`` clock ticks since boot from ``/proc/stat``; ``None`` where it is unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    ticks: dict[int, tuple[int, int]] = {}
    for line in lines:
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        # user nice system idle iowait irq softirq steal (guest time is counted in user already)
        values = [int(v) for v in fields[:8]]
        total = sum(values)
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        ticks[int(name[3:])] = (total - idle, total)
    return ticks


class CoreLoad:
    r"""Whether other processes use this process's cores, from the operating system's CPU accounting.

    Over a window of at least `LOAD_WINDOW_SECONDS` it takes the busy time of the CPUs this
    process may run on (``/proc/stat``, stolen time included) less this process's own CPU time:
    the other processes' share, \(L\) cores. With \(c\) such CPUs and \(t\) threads, the
    cores count as *contended* once \(L > c - t +\) `LOAD_THRESHOLD` (a thread of a static
    split then shares a core) and as free again below that less `LOAD_HYSTERESIS`.
    Where ``/proc/stat`` is missing (not Linux) it says nothing (``None``).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        read_stat: Callable[[], dict[int, tuple[int, int]] | None] = _read_proc_stat,
        own_cpu_seconds: Callable[[], float] = time.process_time,
        cpus: Callable[[], set[int]] | None = None,
        ticks_per_second: float | None = None,
    ) -> None:
        self._clock = clock
        self._read_stat = read_stat
        self._own = own_cpu_seconds
        self._cpus = cpus or (lambda: set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set())
        if ticks_per_second is None:
            ticks_per_second = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._hz = ticks_per_second
        self._last: tuple[float, float, int] | None = None  # (clock, own CPU seconds, busy ticks)
        self.others: float | None = None  # the latest window's other processes' load, in cores
        self._contended: bool | None = None
        self._available = True

    def contended(self, threads: int) -> bool | None:
        """Whether ``threads`` threads of this process would share a core with another process."""
        if not self._available:
            return None
        now = self._clock()
        if self._last is not None and now - self._last[0] < LOAD_WINDOW_SECONDS:
            return self._contended
        stat = self._read_stat()
        cpus = self._cpus()
        if stat is None or not cpus or not cpus <= stat.keys():
            self._available = False  # no accounting of these CPUs here: no hint, ever
            self._contended = None
            return None
        busy, own = sum(stat[c][0] for c in cpus), self._own()
        if self._last is not None:
            then, own_then, busy_then = self._last
            self.others = max(0.0, ((busy - busy_then) / self._hz - (own - own_then)) / (now - then))
            spare = len(cpus) - threads  # cores the static split leaves to others
            if self._contended:
                self._contended = self.others > spare + LOAD_THRESHOLD - LOAD_HYSTERESIS
            else:
                self._contended = self.others > spare + LOAD_THRESHOLD
        self._last = (now, own, busy)
        return self._contended


@dataclass
class _SizeClass:
    # the latest seconds per multiply-add of each choice (a descheduled time slice makes single
    # products several times slower, so the choices compare medians, not means)
    all_threads: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    one_thread: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    one_thread_probed: float = 0.0  # clock time of the latest one-thread product's end
    probe_now: bool = False  # measure the losing choice at the next product
    on_all_threads: bool = True  # the current choice

    def all_threads_win(self) -> bool:
        all_threads, one_thread = statistics.median(self.all_threads), statistics.median(self.one_thread)
        if self.on_all_threads:
            return all_threads <= one_thread
        return all_threads <= (1.0 - WIN_BACK_MARGIN) * one_thread


class ProductThreadChooser:
    """Per size class of product, the faster of all the caller's threads and one thread.

    `use_all_threads` says which to use for the next product of ``work`` multiply-adds;
    `record` takes its measured seconds. ``clock`` is injectable for tests.
    """

    def __init__(
        self, clock: Callable[[], float] = time.perf_counter, load: Callable[[int], bool | None] | None = None
    ) -> None:
        self.clock = clock
        self.load = load  # `CoreLoad.contended`, or None: no hint from the operating system
        self._classes: dict[int, _SizeClass] = {}
        self._all_threads_probed = 0.0  # clock time of the latest all-thread probe or move to one thread
        self._contended: bool | None = None  # the latest hint
        self._lock = threading.Lock()

    @staticmethod
    def _class_of(work: int) -> int:
        return max(work, 1).bit_length() - 1

    def _follow_hint(self, threads: int | None) -> None:
        """A change of the operating system's hint re-measures the losing choice of every class at once."""
        contended = self.load(threads) if self.load is not None and threads is not None else None
        if contended is None:
            self._contended = None
            return
        if self._contended is not None and contended != self._contended:
            for size in self._classes.values():
                size.probe_now = bool(size.all_threads) and len(size.one_thread) >= 2
        self._contended = contended

    def use_all_threads(self, work: int, threads: int | None = None) -> bool:
        """Whether the next product of ``work`` multiply-adds runs on all the caller's ``threads``
        threads (``None``: unknown, the operating system's hint is not asked)."""
        with self._lock:
            self._follow_hint(threads)
            size = self._classes.setdefault(self._class_of(work), _SizeClass())
            if not size.all_threads:
                return True  # first product of the class: the caller's setting
            now = self.clock()
            if len(size.one_thread) < 2:  # two measurements, so that one slow product does not decide
                return False
            probe = size.probe_now
            size.probe_now = False
            if size.all_threads_win():
                one_thread_due = probe or now - size.one_thread_probed >= PROBE_ONE_SECONDS
                return not one_thread_due
            # the load is the machine's: one all-thread probe per period for all classes together
            period = PROBE_ALL_CONTENDED_SECONDS if self._contended else PROBE_ALL_SECONDS
            if probe or now - self._all_threads_probed >= period:
                self._all_threads_probed = now  # the other classes wait for the next period
                return True
            return False

    def record(self, work: int, all_threads: bool, seconds: float) -> None:
        rate = seconds / max(work, 1)
        with self._lock:
            size = self._classes.setdefault(self._class_of(work), _SizeClass())
            if not all_threads:
                size.one_thread_probed = self.clock()
            if not size.all_threads or len(size.one_thread) < 2:
                (size.all_threads if all_threads else size.one_thread).append(rate)
                if size.all_threads and len(size.one_thread) >= 2:
                    size.on_all_threads = size.all_threads_win()  # the first choice, without a margin
                return
            winner_all = size.all_threads_win()
            if winner_all and all_threads and rate > SLOWDOWN * statistics.median(size.all_threads):
                size.probe_now = True  # all threads slowed down (a new load?): re-measure one thread
            (size.all_threads if all_threads else size.one_thread).append(rate)
            all_win = size.all_threads_win()
            size.on_all_threads = all_win
            if winner_all and not all_win:  # moved to one thread: the first probe a period on
                self._all_threads_probed = self.clock()
            elif all_win and not winner_all:
                # all threads won back (two fast probes in a row): the machine has freed up, so every
                # class on one thread re-measures; one fast probe alone may be a lucky time slice
                for other in self._classes.values():
                    ready = bool(other.all_threads) and len(other.one_thread) >= 2
                    other.probe_now = ready and not other.all_threads_win()
            elif all_threads != winner_all:
                median = statistics.median(size.all_threads if winner_all else size.one_thread)
                if rate < (median if winner_all else (1.0 - WIN_BACK_MARGIN) * median):
                    size.probe_now = True  # a probe beat the winner (by the margin): measure it again at once

    def one_thread_classes(self) -> list[int]:
        """The size classes (log2 of multiply-adds) where one thread currently wins."""
        with self._lock:
            return sorted(
                k for k, s in self._classes.items() if s.all_threads and s.one_thread and not s.all_threads_win()
            )


#: The process's chooser, used by `_matmul` inside `_matmul.passes_on_one_thread`.
CHOOSER = ProductThreadChooser(load=CoreLoad().contended)


def adaptive() -> bool:
    """Whether products choose their threads here (not with deterministic algorithms, nor ``=all``)."""
    return not torch.are_deterministic_algorithms_enabled() and product_threads_mode() == "adaptive"
