r"""How many intra-op threads a pair sum's matrix product gets on the CPU: all, or one, measured online.

Inside `_matmul.passes_on_one_thread` the elementwise passes run on one thread and each product
used to widen the pool to the caller's threads. That is the faster choice on an idle machine
(about 1.8x on two cores), but the product library splits a product statically between its
threads, so when another process holds one of the cores the product waits for the descheduled
share and takes longer than on one thread (1.04-1.56x the one-thread time, measured in
``docs/performance.md``). Which case holds changes while a job runs (data-loader workers, other
jobs on a shared host), so it is measured, not configured:

- products are grouped by kind (dtype and library: a float64 product takes twice a float32 one's
  time per multiply-add, MKL's another than oneDNN's) and size class,
  \(\lfloor\log_2(\text{multiply-adds})\rfloor\); the products of one operation, a Gram matrix's strips say,
  are chosen and measured as one (`_matmul.product_group`, item 69);
- per class, each choice keeps its latest `WINDOW` measurements of seconds per multiply-add
  (the first two products take all threads, the next three one thread; the first of each choice is
  not measured: it pays one-time costs, the pool's threads starting and the library planning the
  shape, which put small classes on one thread on an idle machine, item 50);
- a class uses the choice with the lower median (a descheduled time slice makes a single product
  several times slower: one such product must not decide);
- once a class that won clearly on all threads (its products alone, without the passes charged
  to them, at most `CLEAR_WIN` of one thread's time) has moved to one thread, and its latest
  all-thread products alone no longer win clearly (their median: a single descheduled product does not
  count, item 61), the load is taken as the machine's: until a
  class on one thread wins all threads back clearly, a class keeps all threads only where they
  take at most `DECISIVE` of one thread's time. (A clear winner that moves while its latest
  product still won clearly was slowed in the passes after it, a descheduled stretch of
  one-thread work: on an idle CPU D such moves marked a load about every two seconds, item 57.) The choices are not
  independent: an all-thread product can leave the calling thread on the busy core, which slows
  the one-thread work of every other class, so a marginal winner costs more than its own product
  shows (``docs/performance.md``, item 41). A marginal class changing sides (small products near
  1.0 on an idle machine) is noise, not a load: it neither marks one nor ends one (item 50);
- on a core busy from the first product no class wins clearly, so none can move: until one has,
  a class whose one-thread products take at least `LOAD_FROM_THE_START_SECONDS` and whose
  all-thread products alone are no faster marks the load (item 59);
- while all threads win, each class re-measures one thread every `PROBE_ONE_SECONDS` (the
  one-thread time barely moves with load), a costly class less often (`PROBE_ONE_SHARE`, item 62),
  and at once after `SLOWDOWN_PRODUCTS` all-thread products in a row each
  `SLOWDOWN` times slower than the median (a new load shows in the all-thread products
  themselves: two slow ones move the class to one thread, if one thread is faster now; one alone may be
  a moment's noise, or the cold start after a one-thread probe, item 66);
- while one thread wins, one all-thread probe runs every `PROBE_ALL_SECONDS` (under a load that lasts, less often:
  `PROBE_ALL_GROWTH_SECONDS`, item 65), for all such classes
  together: the load is the machine's, and each probe costs more than its own product (after an
  all-thread product the pool's idle thread spins for a while on a core the next one-thread work
  needs). Under a load a probe is a burst of `LONG_PROBE_FACTOR` x `PROBE_WARM_UP_SECONDS` in which
  every short product takes all threads, measured after the warm-up: after a stretch with every
  product on one thread the second core starts slow, and a single short probe measured that slow
  start, not the load, so a load once marked held on an idle machine (item 61). (Without a load the
  other classes' products keep the second core busy, and a probe is one product.) A class whose
  all-thread products cost much more than its one-thread ones takes a probe less often, so that its
  probes cost at most about `PROBE_ALL_SHARE` of the time; the cheap classes' probes see the load
  end for all (item 58). A probe that beats the winner (an all-thread probe: by the bar above) is
  repeated at the next product; when two all-thread probes in a row win a class back clearly (one
  may be a lucky time slice), every class on one thread re-measures at its next product, so the
  machine freeing up is followed within about one probe period (`PROBE_ALL_SECONDS` to
  `PROBE_ALL_MAX_SECONDS`, as old as the load is);
- where the operating system gives its count of runnable tasks (Linux, `_runnable_tasks`), it is read before each
  product of at least `HINT_MIN_WORK` multiply-adds (at most every 5 ms): while two readings in a row see
  other tasks wanting a core, a twin chooser of the same rules measures and chooses the products, and this one
  the others. A load that comes and goes within a training step (a data-loader worker busy early in each step)
  then meets one thread while it is there and all threads once it has gone, without a probe period in between;
  neither condition's measurements steer the other's choices (item 67). Contention the count does not show (a
  host taking a virtual CPU away) is still seen in the products' times, as above;
- each product's time runs to the start of the next product (or the end of the pair sum), so
  that the slowdown of the passes after an all-thread product is charged to it; the load's
  evidence (`CLEAR_WIN`) is the products' own time, which those passes would dilute towards 1.0
  (on CPU C idle classes read 0.76-0.93 charged where the products alone read 0.71-0.77).

What it costs on an idle machine: one product per class every `PROBE_ONE_SECONDS` on one thread;
on a busy core, one all-thread product every `PROBE_ALL_SECONDS`, a costly one less often, and all of them less
often as the load lasts.
The result does not depend on the choice where the product library splits rows and columns only
(oneDNN and MKL on the shapes of ``tests/functional/test_product_threads.py``: bit-identical); with
``torch.use_deterministic_algorithms(True)`` every product takes the caller's threads, as does
everything when the environment variable ``LIGHTNING_HSU_PRODUCT_THREADS=all`` is set.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lightning_hsu.functional import _runnable_tasks, _switches

#: Environment variable choosing the products' threads (`_switches.PRODUCT_THREADS`).
PRODUCT_THREADS_ENV = _switches.PRODUCT_THREADS.name
#: Measurements kept per choice and size class; the choices compare their medians.
WINDOW = 3
#: An all-thread product this much slower than its class's median re-measures one thread next (`SLOWDOWN_PRODUCTS`).
SLOWDOWN = 1.5
#: How many all-thread products in a row must each be `SLOWDOWN` times slower than the median before one thread is
#: re-measured. A load slows every product; a host that takes the second vCPU away for a moment slows one, and so
#: does the product right after a one-thread probe, its second core cold (item 61): with one, each such probe could
#: set off the next (CPU D, idle: the exact 10,000 x 512 MHE took 1.13-1.19x the time of every product on all threads
#: with one, 1.02x with two; item 66). ``1``: one slow product, before item 66.
SLOWDOWN_PRODUCTS = 2
#: While all threads win in a size class, one of its products runs on one thread this often (s).
PROBE_ONE_SECONDS = 2.0
#: While all threads win, a class's one-thread probes cost at most about this fraction of the time: a probe costs
#: the class's one-thread time (with the passes up to the next product) less its all-thread time, and comes only
#: that cost / `PROBE_ONE_SHARE` seconds after the class's previous one, if that is longer than
#: `PROBE_ONE_SECONDS`. A new load needs no periodic probe: it shows in the all-thread products (`SLOWDOWN`).
#: (MGD at 1024 x 512, idle CPU D: with a probe of each of its seven classes every 2 s, 1.07x [1.00, 1.12] the time
#: with the share, paired; item 62.) ``None``: every `PROBE_ONE_SECONDS`, before item 62.
PROBE_ONE_SHARE: float | None = 0.005
#: While one thread wins, one product (of any such class) runs on all threads this often (s); under a load that
#: lasts, less often (`PROBE_ALL_GROWTH_SECONDS`).
PROBE_ALL_SECONDS = 0.5
#: Under a machine-wide load that has lasted L seconds the all-thread probes come every sqrt(PROBE_ALL_GROWTH_SECONDS
#: x L) seconds, from `PROBE_ALL_SECONDS` up to `PROBE_ALL_MAX_SECONDS`. A probe under a load costs about c, a load
#: that has lasted L ends in the next second with a chance of about 1/L, and each second its end goes unseen costs
#: the idle gain g: the rate c/T + g T/(2L) is least at T = sqrt(2cL/g). On CPU D (``bench_lasting_load.py``,
#: item 65) c read 11 ms for MHE at 512 x 4608 and 20 ms for MGD at 1024 x 512, g 0.3-0.35: 2c/g = 0.06-0.13 s.
#: ``None``: every `PROBE_ALL_SECONDS` however old the load, before item 65.
PROBE_ALL_GROWTH_SECONDS: float | None = 0.1
#: The longest all-thread probe period under a load (s), reached at a load's age of 40 s. A load's end is seen at
#: the first probe that wins (a probe after a quiet second core may not, item 61), so a longer period delays it by
#: more than one period. The probes' cost falls as 1/T: from 0.5 s, a 2 s period saves 6/7 of what 4 s would.
PROBE_ALL_MAX_SECONDS = 2.0
#: While one thread wins, a class's own all-thread probes cost at most about this fraction of the time: a probe
#: costs the class's measured all-thread product time less its one-thread one, and the class takes the period's
#: probe only that cost / `PROBE_ALL_SHARE` seconds after its previous one (CPU D, busy core: MGD's 47 ms
#: ``cholesky_inverse`` took 129 ms on all threads, every few periods before; item 58). ``None``: every class
#: every period, as before.
PROBE_ALL_SHARE: float | None = 0.02
#: Under a machine-wide load, a class keeps all threads only if their median time is at most this
#: fraction of one thread's (an idle two-core machine measures about 0.55).
DECISIVE = 2 / 3
#: A clear all-thread win: at most this fraction of one thread's time. A clear winner moving to one
#: thread marks a machine-wide load; a class on one thread winning clearly again ends it (CoMHE's
#: thin products measure 0.65-0.7 idle on CPU B, the large ones about 0.55).
CLEAR_WIN = 0.8
#: Before any class has won clearly on all threads (a machine busy from the start), a load is marked when a class
#: whose one-thread products take at least this long (s) measures all threads no faster, its products alone: such
#: a product wins clearly on an idle machine. (Before item 59 no load was ever marked on a machine busy from the
#: start, and the compiled kernel's calls kept both threads: MGD at 1024 x 512 took 1.05-1.07x its one-thread time
#: with every product on one thread, CPU D.)
LOAD_FROM_THE_START_SECONDS: float | None = 2e-3
#: Under a load, the period's all-thread probe is a burst (s): from the probe's start the classes of short
#: products on one thread take all threads for `LONG_PROBE_FACTOR` times this (and until one product is measured);
#: those that start within this warm-up are not measured unless they last `LONG_PROBE_FACTOR` times it. After a
#: stretch of one-thread work the second core starts slow (CPU D, a 0.76 ms product: 0.45-0.6x its one-thread time
#: warm, 0.7-0.8x after 3 ms of one-thread work, 0.7-1.2x after 10 ms, 1.0-1.7x after 30-100 ms; after 200 ms the
#: first product 1.6-1.75x and the ones from about 2 ms on 0.7x: ``benchmarks/bench_cold_start.py``, item 61).
#: ``None``: the probe is one product, measured however cold (the code before item 61).
PROBE_WARM_UP_SECONDS: float | None = 2e-3
#: A burst lasts this many warm-ups; a cold product this many warm-ups long is measured (its slow start is a small
#: part of it), and a class whose products take that long on one thread joins no burst (its probe is measured cold).
LONG_PROBE_FACTOR = 3
#: A clear winner moving to one thread marks a load only if its products take at least this long (s) on one thread:
#: shorter ones are too noisy inside a penalty (CPU D, hard MHS at 1024 x 512 idle: 7 of 8 loads marked in 15 s came
#: from products of 0.2-0.6 ms whose all-thread time read 0.6-1.5x one thread's; item 63). They still choose
#: their own threads. ``None``: any clear winner, before item 63.
LOAD_EVIDENCE_SECONDS: float | None = 1e-3
#: Whether the chooser reads the operating system's count of other runnable tasks before each large product
#: (`_runnable_tasks`, at most every `_runnable_tasks.REUSE_SECONDS`) and keeps the products made while it sees others
#: wanting a core apart, in a twin chooser (``False``: the products' times alone, as before; kept for the benchmarks).
RUNNABLE_HINT = True
#: Whether the busy twin holds a load from its start (its bar `DECISIVE`, its probes a load's, and the compiled
#: kernel's calls after a one-thread product on one thread: `_matmul.threads_of_last_product`). ``False``: it marks
#: one by the rules above, as a chooser busy from the start does (item 59).
TWIN_LOADED = True
#: Products of at least this many multiply-adds read the count afresh (about 1 ms on one thread of CPU D, against a
#: reading's 38-64 us); smaller ones follow the latest reading.
HINT_MIN_WORK = 2**24
#: Whether a class moving to one thread holds back the marginal all-thread winners of the others
#: (``False``: each class on its own measurements, as before; kept for ``bench_contention.py``).
MACHINE_WIDE = True
#: Whether a load is marked only when a clear winner moves to one thread after an all-thread product that alone
#: did not win clearly (``False``: at any such move, before item 57; kept for ``benchmarks/bench_contention.py``).
LOAD_FROM_PRODUCTS = True
#: Whether that evidence is the median of the class's latest all-thread products alone (``False``: the latest one,
#: before item 61; a single descheduled product, 2-10x its time on an idle CPU D, marked loads there).
LOAD_FROM_MEDIAN = True


class _Window:
    """The latest `WINDOW` measurements of one choice and their median, kept as they come: the chooser reads a
    dozen medians a product (with ``statistics.median`` each time, and a size class built at every call, its own
    time was 14-25 us a product on CPU D, now about 5: ``benchmarks/bench_cold_start.py``, item 64)."""

    __slots__ = ("median", "values")

    def __init__(self) -> None:
        self.values: deque[float] = deque(maxlen=WINDOW)
        self.median = math.nan

    def append(self, value: float) -> None:
        self.values.append(value)
        ordered = sorted(self.values)
        middle = len(ordered) // 2
        self.median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> float:
        return self.values[index]


@dataclass
class _SizeClass:
    # the latest seconds per multiply-add of each choice (a descheduled time slice makes single
    # products several times slower, so the choices compare medians, not means)
    all_threads: _Window = field(default_factory=_Window)
    one_thread: _Window = field(default_factory=_Window)
    # the products' own rates, without the passes up to the next product: the load's evidence
    all_products: _Window = field(default_factory=_Window)
    one_products: _Window = field(default_factory=_Window)
    warmed_up: set[bool] = field(default_factory=set)  # the choices whose first product has run
    one_thread_probed: float = 0.0  # clock time of the latest one-thread product's end
    all_threads_probed: float = float("-inf")  # clock time of the class's latest all-thread probe
    probe_now: bool = False  # measure the losing choice at the next product
    slow_products: int = 0  # all-thread products in a row `SLOWDOWN` times slower than the median

    def all_threads_win(self, bar: float = 1.0) -> bool:
        """Whether all threads' median time is at most ``bar`` times one thread's."""
        return self.all_threads.median <= bar * self.one_thread.median

    def products_win_clearly(self) -> bool:
        """Whether the products alone take at most `CLEAR_WIN` of one thread's time on all threads."""
        return self.all_products.median <= CLEAR_WIN * self.one_products.median

    def one_thread_seconds(self, work: int) -> float:
        """The median time of a product of ``work`` multiply-adds alone on one thread."""
        return self.one_products.median * max(work, 1)


class ProductThreadChooser:
    """Per size class of product, the faster of all the caller's threads and one thread.

    `use_all_threads` says which to use for the next product of ``work`` multiply-adds;
    `record` takes its measured seconds. ``clock`` is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, *, hinted: bool = True) -> None:
        self.clock = clock
        # a twin of the same kind measures the products made while the operating system sees other runnable tasks
        # (`RUNNABLE_HINT`), so that neither condition's measurements steer the other's choices
        self._busy_twin: ProductThreadChooser | None = None
        self._hinted = hinted
        self._route = threading.local()  # the chooser that made this thread's latest choice: self or the twin
        self._classes: dict[tuple[str, int], _SizeClass] = {}
        self._all_threads_probed = 0.0  # clock time of the latest all-thread probe or move to one thread
        self._loaded = False  # a clear winner moved to one thread and no class won back clearly since
        self._load_since = 0.0  # clock time the current load was marked (its age sets the probe period)
        self._load_ended = float("-inf")  # clock time the latest load was seen to end
        self._seen_clear_win = False  # a class has won clearly on all threads: the machine was seen idle
        self._burst_start: float | None = None  # clock time the current all-thread probe's burst began
        self._burst_measured = False  # a product of the current burst has been measured
        self._lock = threading.Lock()

    def _bar(self) -> float:
        """How much faster all threads must be to be kept (`DECISIVE` under a machine-wide load)."""
        return DECISIVE if MACHINE_WIDE and self._loaded else 1.0

    def _keeps_all_threads(self, size: _SizeClass) -> bool:
        return size.all_threads_win(self._bar())

    @staticmethod
    def _class_of(work: int, kind: str) -> tuple[str, int]:
        return kind, max(work, 1).bit_length() - 1

    def _size_class(self, work: int, kind: str) -> _SizeClass:
        """The measurements of ``work``'s size class (built on first use, not at every call)."""
        key = self._class_of(work, kind)
        size = self._classes.get(key)
        if size is None:
            size = self._classes[key] = _SizeClass()
        return size

    def use_all_threads(self, work: int, kind: str = "", threads: int | None = None) -> bool:
        """Whether the next product of ``work`` multiply-adds runs on all the caller's threads.
        ``kind`` names what computes it (dtype and library): kinds keep separate measurements. With the caller's
        ``threads`` the operating system's count of runnable tasks is read (`RUNNABLE_HINT`): while it sees others
        wanting a core, the busy twin measures and chooses."""
        route = self
        if self._others_want_a_core(work, threads):
            with self._lock:
                if self._busy_twin is None:
                    twin = ProductThreadChooser(self.clock, hinted=False)
                    if TWIN_LOADED:  # its products meet another task by construction: a load from its start
                        twin._mark_load()
                    self._busy_twin = twin
                route = self._busy_twin
        self._route.chooser = route
        if route is not self:
            return route.use_all_threads(work, kind)
        with self._lock:
            size = self._size_class(work, kind)
            if not size.all_threads:
                return True  # first products of the class (the first one unmeasured): the caller's setting
            now = self.clock()
            if len(size.one_thread) < 2:  # two measurements, so that one slow product does not decide
                return False
            probe = size.probe_now
            size.probe_now = False
            if self._keeps_all_threads(size):
                one_thread_due = probe or now - size.one_thread_probed >= self._one_thread_period(size, work)
                return not one_thread_due
            # the load is the machine's: one all-thread probe per period for all classes together, a long
            # product's class less often (its probe costs more on a busy core); the cheap probes see the load end.
            # A probe is a burst: after a stretch on one thread the first all-thread products are slow, so the
            # classes due take all threads until one product has been measured warm (`record`)
            burst = self._burst_start
            if burst is not None and self._burst_measured and now - burst >= self._burst_seconds():
                burst = self._burst_start = None  # the burst is over
            if burst is not None and self._joins_burst(size, work, now, burst):
                size.all_threads_probed = now
                return True
            period_over = now - self._all_threads_probed >= self._probe_all_period(now)
            if probe or (period_over and self._probe_due(size, work, now)):
                self._all_threads_probed = now  # the other classes wait for the next period
                size.all_threads_probed = now
                if PROBE_WARM_UP_SECONDS is not None and not probe and self._loaded:  # the pool has been quiet
                    self._burst_start, self._burst_measured = now, False
                return True
            return False

    def keeps_all_threads(self, work: int, kind: str = "") -> bool:
        """Whether ``work``'s size class currently keeps all threads (by the chooser that made this thread's latest
        choice): a one-thread product of such a class is a probe. Also a class still measuring its first products,
        or never seen."""
        route = self._routed()
        with route._lock:
            size = route._classes.get(route._class_of(work, kind))
            return size is None or not size.all_threads or len(size.one_thread) < 2 or route._keeps_all_threads(size)

    def _probe_all_period(self, now: float) -> float:
        """Seconds between the all-thread probes of the classes on one thread (`PROBE_ALL_GROWTH_SECONDS`)."""
        if not self._loaded or PROBE_ALL_GROWTH_SECONDS is None:
            return PROBE_ALL_SECONDS
        grown = math.sqrt(PROBE_ALL_GROWTH_SECONDS * (now - self._load_since))
        return min(PROBE_ALL_MAX_SECONDS, max(PROBE_ALL_SECONDS, grown))

    def _mark_load(self) -> None:
        """Take the load as the machine's. One marked again within `PROBE_ALL_MAX_SECONDS` of the latest load's end
        keeps that load's age: its end was a moment's win (a lucky time slice), not an idle machine."""
        if self._loaded:
            return
        now = self.clock()
        if now - self._load_ended > PROBE_ALL_MAX_SECONDS:
            self._load_since = now
        self._loaded = True

    @staticmethod
    def _burst_seconds() -> float:
        return LONG_PROBE_FACTOR * (PROBE_WARM_UP_SECONDS or 0.0)

    def _joins_burst(self, size: _SizeClass, work: int, now: float, burst: float) -> bool:
        """Whether a class on one thread takes all threads in the current burst: one already in it, or a short
        product's class whose probe is due (a long product is measured cold, at its own period's probe)."""
        if size.all_threads_probed >= burst:
            return True
        short = size.one_thread_seconds(work) < self._burst_seconds()
        return short and self._probe_due(size, work, now)

    def _warming_up(self, seconds: float, product_seconds: float) -> bool:
        """Whether an all-thread product that just ended (the clock is ``seconds`` after its start) is in its
        probe's warm-up, too short to be measured (`PROBE_WARM_UP_SECONDS`); if not, its burst ends."""
        burst, warm_up = self._burst_start, PROBE_WARM_UP_SECONDS
        if burst is None or warm_up is None:
            return False
        if self.clock() - seconds - burst < warm_up and product_seconds < self._burst_seconds():
            return True
        self._burst_measured = True
        return False

    @staticmethod
    def _one_thread_period(size: _SizeClass, work: int) -> float:
        """Seconds between a class's one-thread probes while it keeps all threads (`PROBE_ONE_SHARE`)."""
        if PROBE_ONE_SHARE is None:
            return PROBE_ONE_SECONDS
        # what a probe costs: its time on one thread with the passes up to the next product, less all threads'
        extra = (size.one_thread.median - size.all_threads.median) * max(work, 1)
        return max(PROBE_ONE_SECONDS, extra / PROBE_ONE_SHARE)

    @staticmethod
    def _probe_due(size: _SizeClass, work: int, now: float) -> bool:
        """Whether a class on one thread may take the period's all-thread probe (`PROBE_ALL_SHARE`)."""
        if PROBE_ALL_SHARE is None:
            return True
        # the products' own times (a probe's cost is in the product: with the passes up to the next product
        # the rates of short products are mostly those passes); all threads' median measured under the load
        extra = (size.all_products.median - size.one_products.median) * max(work, 1)
        return now - size.all_threads_probed >= extra / PROBE_ALL_SHARE

    def record(
        self, work: int, all_threads: bool, seconds: float, kind: str = "", product_seconds: float | None = None
    ) -> None:
        """Take a product's measured ``seconds`` (with the passes up to the next product, what the choice
        costs) and ``product_seconds`` (the product alone, the load's evidence; default ``seconds``)."""
        route = self._routed()
        if route is not self:  # the twin chose this product: its measurement
            route.record(work, all_threads, seconds, kind, product_seconds)
            return
        product = seconds if product_seconds is None else product_seconds
        rate, product_rate = seconds / max(work, 1), product / max(work, 1)
        with self._lock:
            size = self._size_class(work, kind)
            if not all_threads:
                size.one_thread_probed = self.clock()
            warming_up = all_threads and self._warming_up(seconds, product)
            if all_threads not in size.warmed_up:  # a first product pays one-time costs (thread start-up,
                size.warmed_up.add(all_threads)  # the library's plan for the shape): not measured
                return
            if warming_up:
                return  # a short product on a second core that was quiet: slow whatever the load
            if not size.all_threads or len(size.one_thread) < 2:
                (size.all_threads if all_threads else size.one_thread).append(rate)
                (size.all_products if all_threads else size.one_products).append(product_rate)
                return
            winner_all = self._keeps_all_threads(size)
            clear_winner = size.products_win_clearly() and self._long_enough_for_evidence(size, work)
            slowed = winner_all and all_threads and rate > SLOWDOWN * size.all_threads.median
            # in a row: a product on one thread in between resets the count (the next one starts cold)
            size.slow_products = size.slow_products + 1 if slowed else 0
            (size.all_threads if all_threads else size.one_thread).append(rate)
            (size.all_products if all_threads else size.one_products).append(product_rate)
            all_win = self._keeps_all_threads(size)
            if all_win and size.slow_products >= SLOWDOWN_PRODUCTS:  # all threads slowed down (a new load?)
                size.probe_now, size.slow_products = True, 0  # but still win on the median: re-measure one thread
            if all_win and size.products_win_clearly():
                self._seen_clear_win = True
            elif not (self._loaded or self._seen_clear_win) and self._loses_from_the_start(size, work):
                self._mark_load()  # a load there before the first product: no clear winner will move
            if winner_all and not all_win:  # moved to one thread: the first probe a period on
                self._all_threads_probed = size.all_threads_probed = self.clock()
                # a clear winner losing is the machine's load: marginal winners elsewhere yield too. The
                # evidence is its latest all-thread product's own time: if it still won clearly, the passes
                # after it were slow (a descheduled stretch of one-thread work), noise rather than a load
                if LOAD_FROM_MEDIAN:
                    lost = not LOAD_FROM_PRODUCTS or not size.products_win_clearly()
                else:
                    lost = not LOAD_FROM_PRODUCTS or size.all_products[-1] > CLEAR_WIN * size.one_products.median
                if clear_winner and lost:
                    self._mark_load()
            elif all_threads and not winner_all and size.all_threads_win() and size.products_win_clearly():
                # all threads won back clearly (two fast probes in a row): the machine has freed up, so
                # every class on one thread re-measures; one fast probe alone may be a lucky time slice
                if self._loaded:
                    self._loaded, self._load_ended = False, self.clock()
                for other in self._classes.values():
                    ready = bool(other.all_threads) and len(other.one_thread) >= 2
                    other.probe_now = ready and not self._keeps_all_threads(other)
            elif all_threads and not winner_all:
                if rate < max(self._bar(), CLEAR_WIN) * size.one_thread.median:
                    size.probe_now = True  # a probe that may win the class back: measure it again at once
            elif not all_threads and winner_all and rate < size.all_threads.median:
                size.probe_now = True  # a probe beat all threads: measure it again at once

    @staticmethod
    def _long_enough_for_evidence(size: _SizeClass, work: int) -> bool:
        """Whether a class's products take long enough on one thread to mark a load (`LOAD_EVIDENCE_SECONDS`)."""
        if LOAD_EVIDENCE_SECONDS is None:
            return True
        return size.one_thread_seconds(work) >= LOAD_EVIDENCE_SECONDS

    @staticmethod
    def _loses_from_the_start(size: _SizeClass, work: int) -> bool:
        """Whether a class's long products measure no faster on all threads, alone (`LOAD_FROM_THE_START_SECONDS`;
        two all-thread measurements, so that one descheduled product does not decide)."""
        if LOAD_FROM_THE_START_SECONDS is None or len(size.all_products) < 2:
            return False
        long_enough = size.one_thread_seconds(work) >= LOAD_FROM_THE_START_SECONDS
        return long_enough and size.all_products.median >= size.one_products.median

    def _others_want_a_core(self, work: int, threads: int | None) -> bool:
        """The operating system's hint (`RUNNABLE_HINT`), read afresh for a product of at least `HINT_MIN_WORK`."""
        if threads is None or not (self._hinted and RUNNABLE_HINT):
            return False
        return bool(_runnable_tasks.READER.busy(threads, read=work >= HINT_MIN_WORK))

    def _routed(self) -> ProductThreadChooser:
        """The chooser that made this thread's latest choice (`use_all_threads`): this one or its busy twin."""
        return getattr(self._route, "chooser", self)

    @property
    def loaded(self) -> bool:
        """Whether a class that won clearly on all threads has moved to one thread (or, before any class has won
        clearly, a long product measured no faster on all threads), and no class on one thread has won all
        threads back clearly since: of the chooser that made this thread's latest choice (this one, or its busy
        twin while the operating system sees other runnable tasks)."""
        return self._routed()._loaded  # the twin routes nothing further (``hinted=False``)

    @property
    def busy_twin(self) -> ProductThreadChooser | None:
        """The chooser of the products made while the operating system saw other runnable tasks (none before)."""
        return self._busy_twin

    def load_age(self) -> float:
        """Seconds since the current load was marked (a load seen ending for a moment keeps its age); 0 without one."""
        return self.clock() - self._load_since if self._loaded else 0.0

    def one_thread_classes(self, kind: str = "") -> list[int]:
        """The size classes (log2 of multiply-adds) of products of ``kind`` that currently take one thread."""
        with self._lock:
            return sorted(
                size
                for (of_kind, size), s in self._classes.items()
                if of_kind == kind and s.all_threads and s.one_thread and not self._keeps_all_threads(s)
            )


#: The process's chooser, used by `_matmul` inside `_matmul.passes_on_one_thread`.
CHOOSER = ProductThreadChooser()


def adaptive() -> bool:
    """Whether products choose their threads here (not with deterministic algorithms, nor ``=all``)."""
    return _switches.PRODUCT_THREADS.read() == "adaptive" and not torch.are_deterministic_algorithms_enabled()
