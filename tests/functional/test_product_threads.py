"""The pair sums' products choose all threads or one by measuring both (issue 20: a busy core).

The chooser's policy is checked against simulated costs (a fake clock): it must settle on the
faster choice per size class, keep re-measuring the slower one at the stated rates, and follow a
change of load. Inside the library the choice must only change thread counts, never results.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import pytest
import torch

from lightning_hsu.functional import _matmul, _product_threads, hyperspherical_energy
from lightning_hsu.functional._matmul import batched_matmul, matmul_into, passes_on_one_thread
from lightning_hsu.functional._product_threads import (
    PROBE_ALL_SECONDS,
    PROBE_ALL_SHARE,
    PROBE_ONE_SECONDS,
    PRODUCT_THREADS_ENV,
    ProductThreadChooser,
)

from .threads import operators_and_threads, thread_spy


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(
    chooser: ProductThreadChooser,
    clock: _FakeClock,
    work: int,
    seconds: Callable[[bool], float],
    calls: int,
    passes: float = 0.0,
):
    """``calls`` products of ``work`` multiply-adds taking ``seconds(all_threads)``, each followed by
    ``passes`` seconds of other work up to the next product (charged to it); the choices made."""
    choices = []
    for _ in range(calls):
        wide = chooser.use_all_threads(work)
        start = clock()
        product = seconds(wide)
        clock.now += product + passes
        chooser.record(work, wide, clock() - start, product_seconds=product)
        choices.append(wide)
    return choices


def _chooser() -> tuple[ProductThreadChooser, _FakeClock]:
    clock = _FakeClock()
    return ProductThreadChooser(clock), clock


MS = 1e-3
IDLE = {True: 5.5 * MS, False: 10 * MS}  # all threads 0.55x one thread: a free two-core machine
BUSY = {True: 13 * MS, False: 10 * MS}  # a core shared with another process: the static split waits
WORK = 10**8


def _seconds(choices: list[bool], cost: dict[bool, float]) -> float:
    return sum(cost[c] for c in choices)


def test_a_window_keeps_the_median_of_its_latest_measurements() -> None:
    """The median kept as measurements come is ``statistics.median`` of the latest `WINDOW` of them."""
    window = _product_threads._Window()
    values = [3.0, 1.0, 2.0, 8.0, 0.5, 0.5, 9.0]
    for count, value in enumerate(values, 1):
        window.append(value)
        assert window.median == statistics.median(values[max(0, count - _product_threads.WINDOW) : count])
    assert window[-1] == 9.0 and len(window) == _product_threads.WINDOW


def test_idle_machine_keeps_all_threads_and_measures_one_thread_once_per_period() -> None:
    chooser, clock = _chooser()
    choices = _run(chooser, clock, WORK, IDLE.__getitem__, 4000)
    assert choices[:5] == [True, True, False, False, False]  # a first product of each, then 1 and 2 measured
    steady = choices[5:]
    probes = steady.count(False)
    expected = _seconds(steady, IDLE) / PROBE_ONE_SECONDS
    assert 0.95 * expected - 1 <= probes <= expected + 1
    assert chooser.one_thread_classes() == []


def test_a_costly_class_re_measures_one_thread_in_proportion_to_the_cost(monkeypatch) -> None:
    """While all threads win, a class's one-thread probe costs its one-thread time less its all-thread one (45 ms
    here): it comes every ``cost / PROBE_ONE_SHARE`` seconds, not every `PROBE_ONE_SECONDS` (item 62: MGD's seven
    classes probing every 2 s cost 11% on an idle CPU D); with the share off (``None``), every 2 s."""
    idle_long = {True: 55 * MS, False: 100 * MS}
    chooser, clock = _chooser()
    choices = _run(chooser, clock, 10**9, idle_long.__getitem__, 6000)[5:]
    seconds, period = _seconds(choices, idle_long), 45 * MS / _product_threads.PROBE_ONE_SHARE
    assert period > PROBE_ONE_SECONDS
    assert seconds / period - 1 <= choices.count(False) <= seconds / period + 1
    monkeypatch.setattr(_product_threads, "PROBE_ONE_SHARE", None)
    chooser, clock = _chooser()
    choices = _run(chooser, clock, 10**9, idle_long.__getitem__, 6000)[5:]
    assert choices.count(False) >= 0.9 * _seconds(choices, idle_long) / PROBE_ONE_SECONDS - 1  # (ends at a product)


def _probe_all_period(age: float) -> float:
    """Item 65's all-thread probe period under a load of ``age`` seconds: sqrt(0.1 s x age), 0.5 s to 2 s."""
    return min(2.0, max(0.5, math.sqrt(0.1 * age)))


def _probes_over(seconds: float, step: float = 1e-3) -> float:
    """How many all-thread probes a load's first ``seconds`` hold at that period: the integral of 1 / period."""
    return sum(step / _probe_all_period((k + 0.5) * step) for k in range(round(seconds / step)))


def test_busy_core_moves_products_to_one_thread_and_probes_all_threads_less_often_as_the_load_lasts(
    monkeypatch,
) -> None:
    """On a busy core every product moves to one thread. The all-thread probes come every 0.5 s at first and less
    often as the load lasts (item 65: about 35 in 40 s, where every 0.5 s would be 80); with the growth off
    (``None``), every `PROBE_ALL_SECONDS`."""
    chooser, clock = _chooser()
    choices = _run(chooser, clock, WORK, BUSY.__getitem__, 4000)
    steady = choices[5:]
    expected = _probes_over(_seconds(steady, BUSY))
    assert 0.95 * expected - 1 <= steady.count(True) <= expected + 1  # a period ends at the next product
    assert chooser.one_thread_classes() == [WORK.bit_length() - 1]
    late = _run(chooser, clock, WORK, BUSY.__getitem__, 12_000)  # 120 s more: a load over 40 s old
    assert late[-8_000:].count(True) <= 80 / 2.0 + 1  # one probe per 2 s
    monkeypatch.setattr(_product_threads, "PROBE_ALL_GROWTH_SECONDS", None)
    chooser, clock = _chooser()
    steady = _run(chooser, clock, WORK, BUSY.__getitem__, 4000)[5:]
    expected = _seconds(steady, BUSY) / PROBE_ALL_SECONDS
    assert 0.95 * expected - 1 <= steady.count(True) <= expected + 1


def test_a_new_load_moves_products_to_one_thread_within_a_few_products() -> None:
    """Two slow all-thread products settle the median of three: the class takes one thread from the third."""
    chooser, clock = _chooser()
    _run(chooser, clock, WORK, IDLE.__getitem__, 100)
    choices = _run(chooser, clock, WORK, BUSY.__getitem__, 8)
    assert choices == [True, True] + [False] * 6
    assert chooser.one_thread_classes() == [WORK.bit_length() - 1]


@pytest.mark.parametrize("busy_products", [500, 20_000])  # a load of 5 s and of 200 s
def test_the_load_ending_brings_all_threads_back_within_a_probe_period(busy_products: int) -> None:
    """The end of a load is seen at the next all-thread probe: within the period of a load that old (item 65)."""
    chooser, clock = _chooser()
    _run(chooser, clock, WORK, BUSY.__getitem__, busy_products)
    age = clock() - 5 * BUSY[False]  # the load is marked after the first five products
    choices = _run(chooser, clock, WORK, IDLE.__getitem__, 1000)
    first = choices.index(True)
    assert _seconds(choices[:first], IDLE) <= _probe_all_period(age) + BUSY[False]
    assert all(choices[first : first + 100])  # repeated at once, then kept
    assert not chooser.loaded


def test_a_load_seen_ending_for_a_moment_keeps_its_age() -> None:
    """A load marked again within `PROBE_ALL_MAX_SECONDS` of its end (a lucky probe, a short break) keeps the
    probe period of its age; one marked later is a new load, probed every `PROBE_ALL_SECONDS` at first."""
    for idle_seconds, fresh in ((1.0, False), (3.0, True)):
        chooser, clock = _chooser()
        _run(chooser, clock, WORK, BUSY.__getitem__, 6000)  # a load 60 s old: probes every 2 s
        idle = _run(chooser, clock, WORK, IDLE.__getitem__, round(idle_seconds / IDLE[True]))
        assert not chooser.loaded and idle[-10:] == [True] * 10
        _run(chooser, clock, WORK, BUSY.__getitem__, 20)
        assert chooser.loaded
        assert (chooser.load_age() < 1.0) if fresh else (chooser.load_age() > 60.0)
        again = _run(chooser, clock, WORK, BUSY.__getitem__, 150)  # 1.5 s
        assert again.count(True) >= 2 if fresh else again.count(True) == 0  # every 0.5 s, or none within 2 s


def test_the_first_product_of_each_choice_is_not_measured() -> None:
    """A class's first product on all threads and on one pays one-time costs (the pool's threads
    starting, the library planning the shape): ten times slower, it must not decide the class."""
    chooser, clock = _chooser()
    first = {True: iter([10 * IDLE[True]]), False: iter([10 * IDLE[False]])}

    def first_slow(all_threads: bool) -> float:
        return next(first[all_threads], IDLE[all_threads])

    choices = _run(chooser, clock, WORK, first_slow, 8)
    assert choices == [True, True, False, False, False, True, True, True]
    assert chooser.one_thread_classes() == []


def test_a_slow_product_alone_is_the_load_not_the_passes_after_it() -> None:
    """The choice counts a product's time up to the next product; the load's evidence is the product
    alone. Idle, the products take 0.55x one thread's time on all threads, followed by 20 ms of passes
    (charged: 0.85x, not a clear win): their loss is a load, and their clear win after it ends it."""
    chooser, clock = _chooser()
    passes = 20 * MS
    _run(chooser, clock, WORK, IDLE.__getitem__, 50, passes)
    assert not chooser.loaded
    _run(chooser, clock, WORK, {True: 40 * MS, False: 10 * MS}.__getitem__, 20, passes)
    assert chooser.loaded and chooser.one_thread_classes() == [WORK.bit_length() - 1]
    choices = _run(chooser, clock, WORK, IDLE.__getitem__, 200, passes)
    assert not chooser.loaded and choices[-50:].count(False) <= 1  # one-thread re-measurements only


def test_slow_passes_after_products_that_still_win_clearly_mark_no_load(monkeypatch) -> None:
    """On an idle machine a stretch of the passes after the all-thread products can run slow (the calling
    thread descheduled by the host) while the products themselves still take 0.55 of one thread: the
    class moves to one thread on its charged time, but that is not a load, and it must not hold back the
    marginal winners elsewhere. With ``LOAD_FROM_PRODUCTS`` off (before item 57) the same marks one."""
    for from_products in (True, False):
        monkeypatch.setattr(_product_threads, "LOAD_FROM_PRODUCTS", from_products)
        chooser, clock = _chooser()
        _run(chooser, clock, WORK, IDLE.__getitem__, 50, passes=1 * MS)
        assert not chooser.loaded
        for _ in range(10):  # the products as idle, the passes after an all-thread product 20 ms slower
            wide = chooser.use_all_threads(WORK)
            start = clock()
            product = IDLE[wide]
            clock.now += product + (21 * MS if wide else 1 * MS)
            chooser.record(WORK, wide, clock() - start, product_seconds=product)
        assert chooser.one_thread_classes() == [WORK.bit_length() - 1]  # the charged time decides the class
        assert chooser.loaded is not from_products


def test_one_descheduled_product_of_a_clear_winner_moving_marks_no_load(monkeypatch) -> None:
    """A clear winner can move to one thread on slow passes after its products (an idle host's noise); if the
    latest of its products was itself descheduled (5x its time, CPU D: 2-10x), the median of its products alone
    still wins clearly, and no load is marked (item 61). Judged on the latest product alone (before item 61), the
    same marks one."""
    for from_median in (True, False):
        monkeypatch.setattr(_product_threads, "LOAD_FROM_MEDIAN", from_median)
        chooser, clock = _chooser()
        _run(chooser, clock, WORK, IDLE.__getitem__, 50, passes=1 * MS)
        assert not chooser.loaded
        products = [IDLE[True], 5 * IDLE[True]]
        while products:  # two all-thread products followed by slow passes, the second one descheduled too
            wide = chooser.use_all_threads(WORK)
            start = clock()
            product = products.pop(0) if wide else IDLE[False]
            clock.now += product + (21 * MS if wide else 1 * MS)
            chooser.record(WORK, wide, clock() - start, product_seconds=product)
        assert chooser.one_thread_classes() == [WORK.bit_length() - 1]
        assert chooser.loaded is not from_median


def test_one_descheduled_product_does_not_switch_the_choice(monkeypatch) -> None:
    """A product slowed 5x once (a time slice lost to another process) changes nothing: a load slows every
    product (item 66). With one slow product enough (``SLOWDOWN_PRODUCTS = 1``, before item 66) it cost one
    re-measurement on one thread, and the idle choice stayed."""
    for slow_products, expected in ((_product_threads.SLOWDOWN_PRODUCTS, [True] * 5), (1, [False] + [True] * 4)):
        monkeypatch.setattr(_product_threads, "SLOWDOWN_PRODUCTS", slow_products)
        chooser, clock = _chooser()
        _run(chooser, clock, WORK, IDLE.__getitem__, 20)
        _run(chooser, clock, WORK, {True: 5 * IDLE[True], False: IDLE[False]}.__getitem__, 1)
        assert _run(chooser, clock, WORK, IDLE.__getitem__, 5) == expected


class _ColdAfterOneThread:
    """An idle machine on which the first all-thread product after a one-thread one takes the one-thread time (its
    second core went quiet meanwhile, item 61) and the others 0.55x it."""

    def __init__(self, one_thread: float) -> None:
        self.one_thread, self.last_all_threads = one_thread, True

    def __call__(self, all_threads: bool) -> float:
        cold = all_threads and not self.last_all_threads
        self.last_all_threads = all_threads
        return self.one_thread if cold or not all_threads else 0.55 * self.one_thread


def test_the_cold_product_after_a_one_thread_probe_sets_off_no_further_probe(monkeypatch) -> None:
    """Idle, a class re-measures one thread at most once per `PROBE_ONE_SECONDS`, although the all-thread product
    after each such probe is 1.8x the median: one slow product is not a load (item 66). With one enough
    (``SLOWDOWN_PRODUCTS = 1``) each probe set off two more, until the cold products filled the median (CPU D: the
    exact 10,000 x 512 MHE took 1.13-1.19x the time of every product on all threads)."""
    cost = {True: 0.55 * 30 * MS, False: 30 * MS}
    chooser, clock = _chooser()
    choices = _run(chooser, clock, 10**9, _ColdAfterOneThread(30 * MS), 2000)[5:]
    probes = choices.count(False)
    assert probes <= _seconds(choices, cost) / PROBE_ONE_SECONDS + 1
    assert not chooser.loaded and chooser.one_thread_classes() == []
    monkeypatch.setattr(_product_threads, "SLOWDOWN_PRODUCTS", 1)
    chooser, clock = _chooser()
    choices = _run(chooser, clock, 10**9, _ColdAfterOneThread(30 * MS), 2000)[5:]
    assert choices.count(False) >= 2.5 * probes


def test_a_class_won_back_by_all_threads_makes_every_class_re_measure() -> None:
    """The load is the machine's: when one class sees it gone (two fast probes), the others try all
    threads at once."""
    chooser, clock = _chooser()
    small, large = 10**7, 10**9
    for _ in range(200):
        _run(chooser, clock, small, {True: 1.3 * MS, False: 1 * MS}.__getitem__, 1)
        _run(chooser, clock, large, {True: 130 * MS, False: 100 * MS}.__getitem__, 1)
    assert len(chooser.one_thread_classes()) == 2
    freed_small = {True: 0.55 * MS, False: 1 * MS}.__getitem__
    freed_large = {True: 55 * MS, False: 100 * MS}.__getitem__
    while not _run(chooser, clock, small, freed_small, 1)[0]:  # the small class's probe comes first,
        pass
    assert _run(chooser, clock, small, freed_small, 1) == [True]  # is confirmed at once ...
    assert chooser.one_thread_classes() == [large.bit_length() - 1]
    assert _run(chooser, clock, large, freed_large, 1) == [True]  # ... and the large one follows at once


def test_one_lucky_all_thread_probe_does_not_wake_the_other_classes() -> None:
    """Under load an all-thread product sometimes gets both cores for its whole length; the probe is
    confirmed in its own class before every class spends a probe."""
    chooser, clock = _chooser()
    small, large = 10**7, 10**9
    busy_small = {True: 1.3 * MS, False: 1 * MS}.__getitem__
    busy_large = {True: 130 * MS, False: 100 * MS}.__getitem__
    for _ in range(200):
        _run(chooser, clock, small, busy_small, 1)
        _run(chooser, clock, large, busy_large, 1)
    lucky = iter([0.55 * MS])

    def once_lucky(all_threads: bool) -> float:
        return next(lucky, 1.3 * MS) if all_threads else 1 * MS

    while not _run(chooser, clock, small, once_lucky, 1)[0]:
        pass
    assert _run(chooser, clock, small, once_lucky, 1) == [True]  # the confirmation: slow
    assert _run(chooser, clock, large, busy_large, 1) == [False]
    assert len(chooser.one_thread_classes()) == 2


def test_a_class_that_keeps_all_threads_does_not_hold_back_the_others_probes() -> None:
    """Under load a large class may still win on all threads; a small one on one thread must still
    probe all threads once per period and come back when the load ends."""
    chooser, clock = _chooser()
    small, large = 10**7, 10**9
    large_cost = {True: 50 * MS, False: 100 * MS}.__getitem__  # wins on all threads, loaded or not
    for _ in range(100):
        _run(chooser, clock, small, {True: 1.3 * MS, False: 1 * MS}.__getitem__, 1)
        _run(chooser, clock, large, large_cost, 1)
    assert chooser.one_thread_classes() == [small.bit_length() - 1]
    start = clock()
    for _ in range(100):
        if _run(chooser, clock, small, {True: 0.55 * MS, False: 1 * MS}.__getitem__, 1)[0]:
            break
        _run(chooser, clock, large, large_cost, 1)
    assert clock() - start <= PROBE_ALL_SECONDS + 0.1


def _busy_short_and_long_classes(chooser, clock, seconds: float) -> tuple[list[bool], list[bool]]:
    """A short class (1 ms on one thread, then 200 ms of passes) and a long one (100 ms on one thread, 250 ms on
    all: MGD's ``cholesky_inverse`` on CPU D) alternating on a busy core for ``seconds`` of simulated time; the
    choices of each. A period mostly ends in the passes, before a long product."""
    short, long = 10**7, 10**9
    short_cost = {True: 1.3 * MS, False: 1 * MS}.__getitem__
    long_cost = {True: 250 * MS, False: 100 * MS}.__getitem__
    short_choices: list[bool] = []
    long_choices: list[bool] = []
    end = clock() + seconds
    while clock() < end:
        short_choices += _run(chooser, clock, short, short_cost, 1, passes=0.2)
        long_choices += _run(chooser, clock, long, long_cost, 1)
    return short_choices, long_choices


def test_a_long_product_takes_all_thread_probes_in_proportion_to_its_time(monkeypatch) -> None:
    """On a busy core an all-thread probe costs more than the one-thread product, so a class whose probes cost
    much (150 ms here) takes one at most every ``cost / PROBE_ALL_SHARE`` seconds (item 58), and the period's
    probes go to the cheap class; with the share off (``None``) the long class takes most of them. (The period
    kept at `PROBE_ALL_SECONDS`: its growth with the load's age is item 65's test.)"""
    monkeypatch.setattr(_product_threads, "PROBE_ALL_GROWTH_SECONDS", None)
    chooser, clock = _chooser()
    _busy_short_and_long_classes(chooser, clock, 5.0)  # settled on one thread
    seconds = 60.0
    short, long = _busy_short_and_long_classes(chooser, clock, seconds)
    assert long.count(True) <= seconds * PROBE_ALL_SHARE / (150 * MS) + 1
    # the period's probes still run: a period ends at the next short product, within a round of both (0.4 s)
    assert short.count(True) >= 0.8 * seconds / (PROBE_ALL_SECONDS + 0.4)
    monkeypatch.setattr(_product_threads, "PROBE_ALL_SHARE", None)
    chooser, clock = _chooser()
    _busy_short_and_long_classes(chooser, clock, 5.0)
    _, long = _busy_short_and_long_classes(chooser, clock, seconds)
    assert long.count(True) >= 0.3 * seconds / PROBE_ALL_SECONDS  # 57 in this run, against at most 9 above


def test_a_long_class_alone_sees_the_load_end_within_its_own_probe_period() -> None:
    """Without short products to probe the machine, the long class's own probes bring all threads back."""
    chooser, clock = _chooser()
    long_busy = {True: 250 * MS, False: 100 * MS}.__getitem__
    long_idle = {True: 55 * MS, False: 100 * MS}.__getitem__
    _run(chooser, clock, 10**9, long_busy, 200)
    assert chooser.one_thread_classes() == [(10**9).bit_length() - 1]
    start = clock()
    choices = _run(chooser, clock, 10**9, long_idle, 200)
    period = 150 * MS / PROBE_ALL_SHARE  # a probe's measured extra cost, spread
    assert clock() - start > period  # the run outlasts it
    first = choices.index(True)
    assert _seconds(choices[:first], {True: 55 * MS, False: 100 * MS}) <= period + 0.1
    assert all(choices[first : first + 30])  # repeated at once, then kept (one thread re-measured every 2 s)
    assert chooser.one_thread_classes() == []


def _loaded_with_a_marginal_large_class(chooser, clock, small: int, large: int, large_cost) -> None:
    """Products of two classes alternating, first on an idle machine, then under a load where the
    small one loses on all threads (it moves to one thread) and the large one costs ``large_cost``."""
    for _ in range(20):
        _run(chooser, clock, small, {True: 0.55 * MS, False: 1 * MS}.__getitem__, 1)
        _run(chooser, clock, large, {True: 55 * MS, False: 100 * MS}.__getitem__, 1)
    for _ in range(100):
        _run(chooser, clock, small, {True: 1.3 * MS, False: 1 * MS}.__getitem__, 1)
        _run(chooser, clock, large, large_cost, 1)


def test_under_a_machine_wide_load_a_marginal_all_thread_winner_takes_one_thread_too() -> None:
    """Once a class has moved to one thread, another whose all-thread win is marginal (0.85 of one
    thread's time, not `DECISIVE`) takes one thread too, probing all threads once per period: its
    all-thread products would leave the calling thread on the busy core for the others."""
    chooser, clock = _chooser()
    small, large = 10**7, 10**9
    marginal = {True: 85 * MS, False: 100 * MS}.__getitem__
    _loaded_with_a_marginal_large_class(chooser, clock, small, large, marginal)
    assert chooser.one_thread_classes() == sorted([small.bit_length() - 1, large.bit_length() - 1])
    choices = [_run(chooser, clock, large, marginal, 1)[0] for _ in range(40)]
    assert choices.count(True) <= 40 * 100 * MS / PROBE_ALL_SECONDS + 1  # the period's probes only


def test_under_a_machine_wide_load_a_decisive_all_thread_winner_keeps_all_threads() -> None:
    """A large product still twice as fast on all threads under the load (more cores, one busy)
    keeps them: the machine-wide rule holds back marginal winners only."""
    chooser, clock = _chooser()
    small, large = 10**7, 10**9
    decisive = {True: 50 * MS, False: 100 * MS}.__getitem__
    _loaded_with_a_marginal_large_class(chooser, clock, small, large, decisive)
    assert chooser.one_thread_classes() == [small.bit_length() - 1]
    choices = [_run(chooser, clock, large, decisive, 1)[0] for _ in range(40)]
    assert choices.count(False) <= 1  # one-thread re-measurements only (one per PROBE_ONE_SECONDS)


def test_the_marginal_winner_takes_all_threads_back_when_the_load_ends() -> None:
    chooser, clock = _chooser()
    small, large = 10**7, 10**9
    _loaded_with_a_marginal_large_class(chooser, clock, small, large, {True: 85 * MS, False: 100 * MS}.__getitem__)
    freed_small = {True: 0.55 * MS, False: 1 * MS}.__getitem__
    freed_large = {True: 55 * MS, False: 100 * MS}.__getitem__
    start = clock()
    for _ in range(20):
        _run(chooser, clock, small, freed_small, 1)
        _run(chooser, clock, large, freed_large, 1)
    assert chooser.one_thread_classes() == []
    assert _run(chooser, clock, large, freed_large, 3) == [True] * 3
    assert clock() - start <= 2 * PROBE_ALL_SECONDS + 1.0


def test_a_machine_busy_from_the_start_is_a_load(monkeypatch) -> None:
    """No class ever wins clearly on a core busy from the first product, so no clear winner can move: a long
    product measuring no faster on all threads (twice) marks the load instead (item 59), and the load ends as
    any other when the machine frees up. With the rule off (before item 59) no load is ever marked."""
    chooser, clock = _chooser()
    _run(chooser, clock, WORK, BUSY.__getitem__, 5)  # the first products of each choice
    assert not chooser.loaded  # one all-thread measurement: not yet
    _run(chooser, clock, WORK, BUSY.__getitem__, 1 + int(PROBE_ALL_SECONDS / BUSY[False]))
    assert chooser.loaded and chooser.one_thread_classes() == [WORK.bit_length() - 1]  # at the first probe
    choices = _run(chooser, clock, WORK, IDLE.__getitem__, 200)
    assert not chooser.loaded and all(choices[-50:-10])
    monkeypatch.setattr(_product_threads, "LOAD_FROM_THE_START_SECONDS", None)
    chooser, clock = _chooser()
    _run(chooser, clock, WORK, BUSY.__getitem__, 200)
    assert not chooser.loaded and chooser.one_thread_classes() == [WORK.bit_length() - 1]


class _QuietSecondCore:
    """An idle machine whose second core starts slow (CPU D, item 61): an all-thread product takes 0.6x its
    one-thread time once all-thread products have run back to back (each within 3 ms of the last) for 2 ms,
    and 1.8x before that; ``busy`` makes every all-thread product 1.3x (a core shared with another process)."""

    def __init__(self, clock: _FakeClock, one_thread: float) -> None:
        self.clock, self.one_thread, self.busy = clock, one_thread, False
        self.stretch_start = self.last_end = float("-inf")

    def __call__(self, all_threads: bool) -> float:
        if not all_threads:
            return self.one_thread
        now = self.clock()
        if now - self.last_end >= 3 * MS:
            self.stretch_start = now
        factor = 1.3 if self.busy else (0.6 if now - self.stretch_start >= 2 * MS else 1.8)
        self.last_end = now + factor * self.one_thread
        return factor * self.one_thread


def _loaded_then_freed(chooser: ProductThreadChooser, clock: _FakeClock, seconds: float) -> list[bool]:
    """Short products (1.5 ms on one thread, 0.2 ms of passes after each) on a busy core, then ``seconds`` of
    them on the freed machine with its slow-starting second core; the choices on the freed machine."""
    machine = _QuietSecondCore(clock, 1.5 * MS)
    machine.busy = True
    _run(chooser, clock, WORK, lambda wide: {True: 0.825 * MS, False: 1.5 * MS}[wide], 50, passes=0.2 * MS)
    end = clock() + 2.0
    while clock() < end:
        _run(chooser, clock, WORK, machine, 1, passes=0.2 * MS)
    assert chooser.loaded
    machine.busy = False
    choices: list[bool] = []
    end = clock() + seconds
    while clock() < end:
        choices += _run(chooser, clock, WORK, machine, 1, passes=0.2 * MS)
    return choices


def test_a_load_ends_although_a_probe_after_a_quiet_second_core_is_slow(monkeypatch) -> None:
    """Under a load every product runs on one thread, so each all-thread probe finds the second core quiet and
    slow (1.8x one thread on its first 2 ms). The probe is a burst judged after its warm-up: the freed machine is
    seen at the first probe and all threads come back (item 61). A single probe (``None``, before item 61)
    always measures the slow start, and the load is never seen to end."""
    chooser, clock = _chooser()
    choices = _loaded_then_freed(chooser, clock, 3.0)
    assert not chooser.loaded and chooser.one_thread_classes() == []
    first = choices.index(True)
    assert _seconds(choices[:first], {True: 1.1 * MS, False: 1.7 * MS}) <= PROBE_ALL_SECONDS
    assert choices[-100:].count(False) <= 2  # one-thread re-measurements only
    monkeypatch.setattr(_product_threads, "PROBE_WARM_UP_SECONDS", None)
    chooser, clock = _chooser()
    choices = _loaded_then_freed(chooser, clock, 3.0)
    assert chooser.loaded and choices[-100:].count(True) <= 1


def test_a_probe_burst_on_a_busy_core_costs_its_warm_up_and_one_product_a_period(monkeypatch) -> None:
    """While the core stays busy a burst runs all threads for its warm-up (`PROBE_WARM_UP_SECONDS`) and one
    measured product, once per `PROBE_ALL_SECONDS` (kept so: its growth is item 65's test): the load is kept and
    the bursts' time stays that small."""
    monkeypatch.setattr(_product_threads, "PROBE_ALL_GROWTH_SECONDS", None)
    chooser, clock = _chooser()
    machine = _QuietSecondCore(clock, 1.5 * MS)
    machine.busy = True
    _run(chooser, clock, WORK, lambda wide: {True: 0.825 * MS, False: 1.5 * MS}[wide], 50, passes=0.2 * MS)
    _run(chooser, clock, WORK, machine, 1200, passes=0.2 * MS)  # about 2 s: loaded
    assert chooser.loaded
    start, choices = clock(), _run(chooser, clock, WORK, machine, 12_000, passes=0.2 * MS)
    periods = (clock() - start) / PROBE_ALL_SECONDS
    burst = _product_threads.LONG_PROBE_FACTOR * _product_threads.PROBE_WARM_UP_SECONDS
    per_burst = (burst + 2 * 2.15 * MS) / (1.95 * MS + 0.2 * MS)  # its products, and one started at its end
    assert chooser.loaded and choices.count(True) <= (periods + 1) * per_burst
    assert choices.count(True) >= periods * 2  # each period's burst ran: warm-up and a measured product


def test_a_short_clear_winner_moving_marks_no_load(monkeypatch) -> None:
    """Products under `LOAD_EVIDENCE_SECONDS` on one thread (0.5 ms here) read too noisily inside a penalty to be the
    machine's evidence (item 63): such a clear winner moving to one thread moves alone. A longer one (2 ms) marks
    the load; with the rule off (before item 63) the short one does too."""
    for one_thread, rule, marks in ((0.5 * MS, 1e-3, False), (2 * MS, 1e-3, True), (0.5 * MS, None, True)):
        monkeypatch.setattr(_product_threads, "LOAD_EVIDENCE_SECONDS", rule)
        chooser, clock = _chooser()
        _run(chooser, clock, WORK, {True: 0.55 * one_thread, False: one_thread}.__getitem__, 50, passes=0.2 * MS)
        _run(chooser, clock, WORK, {True: 1.3 * one_thread, False: one_thread}.__getitem__, 20, passes=0.2 * MS)
        assert chooser.one_thread_classes() == [WORK.bit_length() - 1]
        assert chooser.loaded is marks


def test_short_products_losing_from_the_start_mark_no_load() -> None:
    """A product too short to gain from two threads on an idle machine (1 ms on one thread) is no evidence."""
    chooser, clock = _chooser()
    _run(chooser, clock, 10**7, {True: 1.3 * MS, False: 1 * MS}.__getitem__, 200)
    assert not chooser.loaded and chooser.one_thread_classes() == [(10**7).bit_length() - 1]


def test_after_a_clear_win_only_a_clear_winner_moving_marks_a_load() -> None:
    """Once a class has won clearly (the machine was seen idle), the rule from the start no longer applies:
    a marginal class losing is not a load (item 50)."""
    chooser, clock = _chooser()
    small, large = 10**8, 10**9
    for _ in range(20):  # the large class wins clearly, the small one is marginal
        _run(chooser, clock, small, {True: 9 * MS, False: 10 * MS}.__getitem__, 1)
        _run(chooser, clock, large, {True: 55 * MS, False: 100 * MS}.__getitem__, 1)
    for _ in range(20):  # the small one loses on all threads, the large one still wins clearly
        _run(chooser, clock, small, {True: 11 * MS, False: 10 * MS}.__getitem__, 1)
        _run(chooser, clock, large, {True: 55 * MS, False: 100 * MS}.__getitem__, 1)
    assert chooser.one_thread_classes() == [small.bit_length() - 1]
    assert not chooser.loaded


def test_a_marginal_class_changing_sides_marks_no_load() -> None:
    """A small product near one thread's speed on all threads (0.9 idle, 1.1 a moment later: noise
    of the pool's start-up, not a load) moves to one thread without holding back a large class
    whose win is marginal (0.85): only a clear winner's loss is the machine's load."""
    chooser, clock = _chooser()
    small, large = 10**7, 10**9
    large_cost = {True: 85 * MS, False: 100 * MS}.__getitem__
    for _ in range(20):
        _run(chooser, clock, small, {True: 0.9 * MS, False: 1 * MS}.__getitem__, 1)
        _run(chooser, clock, large, large_cost, 1)
    for _ in range(20):
        _run(chooser, clock, small, {True: 1.1 * MS, False: 1 * MS}.__getitem__, 1)
        _run(chooser, clock, large, large_cost, 1)
    assert chooser.one_thread_classes() == [small.bit_length() - 1]
    assert not chooser.loaded
    assert _run(chooser, clock, large, large_cost, 3).count(True) >= 2  # one may be its one-thread probe


def test_a_load_ends_by_a_clear_win_of_a_class_under_the_decisive_bar() -> None:
    """CoMHE's case: a large class (0.55 idle) marks a load and is not called again (the job moved on
    to other layers); a thin class that wins 0.7 idle, above `DECISIVE`, took one thread under the
    load and must take all threads back when the load ends, not keep one thread forever."""
    chooser, clock = _chooser()
    large, thin = 10**9, 10**7
    for _ in range(20):
        _run(chooser, clock, large, IDLE.__getitem__, 1)
        _run(chooser, clock, thin, {True: 0.7 * MS, False: 1 * MS}.__getitem__, 1)
    for _ in range(20):
        _run(chooser, clock, large, BUSY.__getitem__, 1)
        _run(chooser, clock, thin, {True: 1.3 * MS, False: 1 * MS}.__getitem__, 1)
    assert chooser.loaded
    assert chooser.one_thread_classes() == sorted([large.bit_length() - 1, thin.bit_length() - 1])
    freed_thin = {True: 0.7 * MS, False: 1 * MS}
    choices = _run(chooser, clock, thin, freed_thin.__getitem__, 2000)
    first = choices.index(True)
    assert _seconds(choices[:first], freed_thin) <= PROBE_ALL_SECONDS
    assert all(choices[first : first + 100])  # confirmed at once, then kept
    assert not chooser.loaded


def test_each_class_on_its_own_measurements_without_the_machine_wide_rule(monkeypatch) -> None:
    """``MACHINE_WIDE = False`` (the benchmark's ablation): the marginal winner keeps all threads."""
    monkeypatch.setattr(_product_threads, "MACHINE_WIDE", False)
    chooser, clock = _chooser()
    small, large = 10**7, 10**9
    _loaded_with_a_marginal_large_class(chooser, clock, small, large, {True: 85 * MS, False: 100 * MS}.__getitem__)
    assert chooser.one_thread_classes() == [small.bit_length() - 1]


def test_size_classes_choose_separately() -> None:
    """Small products may lose on all threads (start-up of the pool) while large ones win."""
    chooser, clock = _chooser()
    small, large = 10**5, 10**9
    small_choices = _run(chooser, clock, small, {True: 2e-5, False: 1e-5}.__getitem__, 40)
    large_choices = _run(chooser, clock, large, IDLE.__getitem__, 40)
    assert small_choices[-5:] == [False] * 5
    assert large_choices[-5:] == [True] * 5
    assert chooser.one_thread_classes() == [small.bit_length() - 1]


def test_rates_are_per_multiply_add_within_a_class() -> None:
    """Two sizes of one class (a factor < 2 apart) compare their seconds per multiply-add."""
    chooser = ProductThreadChooser()
    a, b = 2**27, 2**27 + 2**26
    chooser.record(a, True, 1.0 * a)  # all threads: 1 second per multiply-add ...
    chooser.record(b, False, 1.5 * b)  # ... one thread: 1.5, measured on a larger product
    chooser.record(b, False, 1.5 * b)
    assert chooser.one_thread_classes() == []
    assert chooser.use_all_threads(a) is True


def test_kinds_of_product_choose_separately() -> None:
    """A float64 product of a size takes about twice a float32 one's time: their rates do not mix."""
    chooser, clock = _chooser()
    for _ in range(500):
        for kind, cost in (("torch.float32 onednn", IDLE), ("torch.float64 bmm", BUSY)):
            wide = chooser.use_all_threads(WORK, kind)
            start = clock()
            clock.now += cost[wide] * (2 if "float64" in kind else 1)
            chooser.record(WORK, wide, clock() - start, kind)
    assert chooser.one_thread_classes("torch.float32 onednn") == []
    assert chooser.one_thread_classes("torch.float64 bmm") == [WORK.bit_length() - 1]


def test_bad_setting_names_the_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv(PRODUCT_THREADS_ENV, "some")
    with pytest.raises(ValueError, match=PRODUCT_THREADS_ENV):
        _product_threads.adaptive()


# ---- inside the library ---------------------------------------------------------------------------
class _Forced(ProductThreadChooser):
    """A chooser that always answers ``all_threads`` and records what it was told."""

    def __init__(self, all_threads: bool, clock: Callable[[], float] | None = None) -> None:
        super().__init__() if clock is None else super().__init__(clock)
        self.answer = all_threads
        self.recorded: list[tuple[int, bool]] = []
        self.seconds: list[float] = []
        self.product_seconds: list[float | None] = []
        self.kinds: list[str] = []

    def use_all_threads(self, work: int, kind: str = "", threads: int | None = None) -> bool:
        return self.answer

    def record(
        self, work: int, all_threads: bool, seconds: float, kind: str = "", product_seconds: float | None = None
    ) -> None:
        self.recorded.append((work, all_threads))
        self.seconds.append(seconds)
        self.product_seconds.append(product_seconds)
        self.kinds.append(kind)


def _product_thread_counts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    counts: list[int] = []
    if _matmul.onednn_matmul_enabled():
        monkeypatch.setattr(_matmul, "_onednn_product", thread_spy(counts, _matmul._onednn_product))
    else:
        monkeypatch.setattr(torch, "bmm", thread_spy(counts, torch.bmm))
    return counts


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("all_threads", [True, False])
def test_products_run_on_the_chosen_threads_and_report_their_size(all_threads, monkeypatch) -> None:
    chooser = _Forced(all_threads)
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    counts = _product_thread_counts(monkeypatch)
    a, b = torch.randn(1, 64, 300), torch.randn(1, 300, 40)
    with passes_on_one_thread(a.device):
        batched_matmul(a, b)
        assert torch.get_num_threads() == 1
    assert counts == [2 if all_threads else 1]
    assert chooser.recorded == [(64 * 300 * 40, all_threads)]
    assert torch.get_num_threads() == 2
    with passes_on_one_thread(a.device):
        batched_matmul(a.double(), b.double())  # MKL's float64 product: another kind
    float32 = _matmul.ONEDNN_KIND if _matmul.onednn_matmul_enabled() else "torch.float32 bmm"
    assert chooser.kinds == [float32, "torch.float64 bmm"]


@pytest.mark.usefixtures("two_threads")
def test_thin_products_are_measured_apart_from_deep_ones_of_the_same_size(monkeypatch) -> None:
    """CoMHE's Gram products of 40-dimensional projections and its gradient products have the same
    multiply-adds but not the same time per multiply-add: measured in one class, the medians flipped
    with the mix of the latest three. A product whose inner dimension is below 64 is a kind apart."""
    chooser = _Forced(True)
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    rows, grad = torch.randn(1, 256, 40), torch.randn(1, 256, 256)
    with passes_on_one_thread(rows.device):
        batched_matmul(rows, rows.transpose(1, 2))  # 256 x 40 x 256 multiply-adds, depth 40
        batched_matmul(grad, rows)  # 256 x 256 x 40, the same count, depth 256
        matmul_into(torch.empty(1, 256, 256), rows, rows.transpose(1, 2))
    assert [work for work, _ in chooser.recorded] == [256 * 40 * 256] * 3
    thin, deep, thin_into = chooser.kinds
    assert thin == thin_into != deep and thin.endswith(", thin") and not deep.endswith(", thin")


#: the operators that compute a product (what may run on more than one thread inside `passes_on_one_thread`)
_PRODUCT_OPERATORS = {"aten.bmm.default", "aten.baddbmm_.default", "mkldnn._linear_pointwise.default"}


@pytest.mark.usefixtures("two_threads", "product_library")
@pytest.mark.parametrize("all_threads", [True, False])
def test_a_gram_matrix_in_strips_chooses_once_for_all_its_strips(all_threads, monkeypatch) -> None:
    """Item 69: `gram`'s strips are one group of products. The chooser is asked and told once, with the strips'
    multiply-adds in all; every strip's product runs on that choice and the passes between them on one thread.
    With `PRODUCT_GROUPS` off, each strip is chosen and measured on its own, and the matrix is the same."""
    chooser = _Forced(all_threads)
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    rows = torch.randn(1, 512, 512, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    assert _matmul.gram_in_strips(rows)
    with passes_on_one_thread(rows.device):
        seen = operators_and_threads(lambda: _matmul.gram(rows))
        grouped = _matmul.gram(rows)
    strips = [128 * (512 - start) * 512 for start in range(0, 512, 128)]
    assert chooser.recorded == [(sum(strips), all_threads)] * 2
    products = [threads for op, threads in seen if op in _PRODUCT_OPERATORS]
    assert products == [2 if all_threads else 1] * len(strips)
    assert {threads for op, threads in seen if op not in _PRODUCT_OPERATORS} <= {1}
    monkeypatch.setattr(_matmul, "PRODUCT_GROUPS", False)
    chooser.recorded.clear()
    with passes_on_one_thread(rows.device):
        each = _matmul.gram(rows)
    assert chooser.recorded == [(work, all_threads) for work in strips]
    assert torch.equal(grouped, each)
    torch.testing.assert_close(grouped[0].double(), rows[0].double() @ rows[0].double().T, rtol=1e-5, atol=1e-3)


@pytest.mark.usefixtures("two_threads", "product_library")
@pytest.mark.parametrize("all_threads", [True, False])
def test_a_batch_of_products_is_chosen_and_measured_once(all_threads, monkeypatch) -> None:
    """Item 69: a batch of products (oneDNN runs one matrix at a time) is one choice of the whole batch's
    multiply-adds, on either library; a group inside a group (`product_group`) keeps the outer one's choice."""
    chooser = _Forced(all_threads)
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    a, b = torch.randn(3, 64, 300), torch.randn(3, 300, 40)
    with passes_on_one_thread(a.device):
        seen = operators_and_threads(lambda: batched_matmul(a, b))
        with _matmul.product_group(10**9, "outer"):
            nested = batched_matmul(a, b)
    assert chooser.recorded == [(3 * 64 * 300 * 40, all_threads), (10**9, all_threads)]
    assert chooser.kinds[1] == "outer"
    products = [threads for op, threads in seen if op in _PRODUCT_OPERATORS]
    assert products and set(products) == {2 if all_threads else 1}
    assert {threads for op, threads in seen if op not in _PRODUCT_OPERATORS} <= {1}
    torch.testing.assert_close(nested.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.usefixtures("two_threads")
def test_a_product_is_charged_the_passes_up_to_the_next_product(monkeypatch) -> None:
    """After an all-thread product the pool's idle thread slows the one-thread passes that follow:
    each product's time runs to the next product, or to the end of the context; the product's own
    time (the load's evidence) is reported beside it."""
    clock = _FakeClock()
    chooser = _Forced(True, clock)
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    a = torch.randn(1, 8, 8)
    with passes_on_one_thread(a.device):
        batched_matmul(a, a)
        clock.now += 0.25  # the passes after the first product
        batched_matmul(a, a)
        assert chooser.seconds == [0.25]
        clock.now += 0.5
    assert chooser.seconds == [0.25, 0.5]
    assert chooser.product_seconds == [0.0, 0.0]  # the fake clock does not move inside a product


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("half_space", [True, False])
@pytest.mark.parametrize("chunk", [None, 128])
def test_energy_and_gradient_are_the_same_on_either_choice(half_space, chunk, monkeypatch) -> None:
    """Whatever the chooser picks, the penalty equals the float64 statement to float32 rounding and the
    two choices agree with each other to the last bits (the product library splits rows, not sums)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 2304, generator=g)
    results = {}
    for all_threads in (True, False):
        monkeypatch.setattr(_product_threads, "CHOOSER", _Forced(all_threads))
        leaf = w.clone().requires_grad_()
        value = hyperspherical_energy(leaf, half_space=half_space, chunk_size=chunk)
        value.backward()
        results[all_threads] = (value.detach(), leaf.grad)
    (v2, g2), (v1, g1) = results[True], results[False]
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9)
    # an independent float64 statement: mean of 1/||u_i - u_j||^2 over the distinct pairs
    u = w.double() / torch.sqrt((w.double() ** 2).sum(-1, keepdim=True) + 1e-4)
    x = torch.cat([u, -u]) if half_space else u
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    dist2 = (2 - 2 * (x @ x.T)[i, j]).clamp_min(1e-6)
    torch.testing.assert_close(v1.double(), (1 / dist2).mean(), rtol=1e-4, atol=0.0)


@pytest.mark.usefixtures("two_threads")
def test_library_products_feed_the_process_chooser(monkeypatch) -> None:
    """Wired in: a penalty's products are measured by the process's chooser (both choices, at first)."""
    chooser = ProductThreadChooser()
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    w = torch.randn(256, 2304, requires_grad=True)
    for _ in range(6):  # each class: two products on all threads and three on one, the first of each unmeasured
        hyperspherical_energy(w, half_space=True).backward()
    sizes = chooser._classes
    assert sizes and all(s.all_threads and s.one_thread for s in sizes.values())
    kind = _matmul.ONEDNN_KIND if _matmul.onednn_matmul_enabled() else "torch.float32 bmm"
    assert {of_kind for of_kind, _ in sizes} == {kind}


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("switch", ["environment", "deterministic"])
def test_all_threads_when_the_user_fixes_them(switch, monkeypatch) -> None:
    chooser = _Forced(False)
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    counts = _product_thread_counts(monkeypatch)
    if switch == "environment":
        monkeypatch.setenv(PRODUCT_THREADS_ENV, "all")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(switch == "deterministic")
    try:
        with passes_on_one_thread(torch.device("cpu")):
            batched_matmul(torch.randn(1, 8, 8), torch.randn(1, 8, 8))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert counts == [2]
    assert chooser.recorded == []


@pytest.mark.usefixtures("two_threads")
def test_the_work_after_a_one_thread_product_follows_its_class_not_only_the_load(monkeypatch) -> None:
    """A one-thread product is a probe where its class keeps all threads (the compiled kernel's call after it keeps
    both threads on an idle machine), else the class's own choice (the call takes one thread even with no load
    marked: under a load that lasts, a load seen ending for a moment left the classes on one thread, item 68)."""
    chooser, clock = _chooser()
    small = 10**6
    assert chooser.keeps_all_threads(WORK) and chooser.keeps_all_threads(small)  # nothing measured yet
    choices = _run(chooser, clock, WORK, IDLE.__getitem__, 500)  # 2.75 s: a one-thread probe every 2 s
    assert chooser.keeps_all_threads(WORK) and not all(choices[10:])  # its one-thread probes: still a winner
    # products too short to mark a load that lose on all threads: one thread is the class's own choice
    _run(chooser, clock, small, {True: 0.3 * MS, False: 0.2 * MS}.__getitem__, 20)
    assert not chooser.keeps_all_threads(small) and not chooser.loaded
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    monkeypatch.delenv(PRODUCT_THREADS_ENV, raising=False)
    for follows, after_small in ((True, 1), (False, 2)):
        monkeypatch.setattr(_matmul, "KERNEL_FOLLOWS_CLASS", follows)
        with passes_on_one_thread(torch.device("cpu")):
            assert _matmul.threads_of_last_product() == 2  # no product yet: no load, all threads
            with _matmul.chosen_threads(small, ""):
                pass
            assert _matmul.threads_of_last_product() == after_small
            with _matmul.chosen_threads(WORK, ""):
                wide = torch.get_num_threads() == 2
            assert _matmul.threads_of_last_product() == 2  # all threads, or a probe of the winner
            assert wide or chooser.keeps_all_threads(WORK)
