"""The product chooser's hint from the operating system: other runnable tasks (item 67 of docs/performance.md).

The reader is checked on a `/proc` written by the test (its counts are known), then on the real one against a
process that spins; the chooser is checked to keep the products made while the hint says busy apart, in its twin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_hsu.functional import _cpu_pairs, _product_threads, _runnable_tasks
from lightning_hsu.functional._runnable_tasks import REUSE_SECONDS, RunnableTasks

LINUX_PROC = sys.platform.startswith("linux") and os.path.exists("/proc/loadavg")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _proc(root: Path, running: int, states: dict[int, str]) -> None:
    """A `/proc` with ``running`` runnable tasks in its load line and a thread of each state in ``states``."""
    (root / "loadavg").write_text(f"0.52 0.61 0.70 {running}/311 4242\n")
    for tid, state in states.items():
        task = root / "self" / "task" / str(tid)
        task.mkdir(parents=True, exist_ok=True)
        # a command name with a parenthesis and a space in it: the state follows the last ')'
        (task / "stat").write_text(f"{tid} (pt) main) {state} 1 {tid} {tid} 0 -1 4194560 0 0 0 0 5 3 0 0 20\n")


def test_others_are_the_running_count_less_the_caller_and_its_running_team(tmp_path: Path) -> None:
    _proc(tmp_path, running=5, states={11: "R", 12: "S", 13: "R"})
    reader = RunnableTasks(team_ids=lambda threads: [10, 11, 12, 13][:threads], root=str(tmp_path))
    assert reader.others(4) == 5 - 1 - 2  # the caller (10) and the running 11 and 13
    assert reader.others(2) == 5 - 1 - 1  # a team of two: the caller and 11
    assert reader.others(1) == 5 - 1


def test_the_machine_is_busy_after_two_readings_in_a_row_that_saw_others_wanting_a_core(tmp_path: Path) -> None:
    """Two cores and two threads: one other runnable task wants a core. A single reading does not decide (other
    tasks' short wake-ups), a reading is reused for `REUSE_SECONDS`, and ``read=False`` reads nothing."""
    clock = _Clock()
    reader = RunnableTasks(
        team_ids=lambda threads: [10, 11][:threads], root=str(tmp_path), clock=clock, cores=lambda: 2
    )
    answers = []
    for running in (2, 2, 1, 2, 1, 1, 2, 2):  # the caller, and another task or not; the team thread sleeps
        _proc(tmp_path, running=running, states={11: "S"})
        clock.now += 1.5 * REUSE_SECONDS  # later than the reuse, whatever the float rounding
        answers.append(reader.busy(2))
    assert answers == [False, True, False, False, False, False, False, True]
    _proc(tmp_path, running=1, states={11: "S"})
    clock.now += REUSE_SECONDS / 2
    assert reader.busy(2) is True  # within REUSE_SECONDS: the latest answer
    clock.now += 1.5 * REUSE_SECONDS
    assert reader.busy(2, read=False) is True  # not read
    assert reader.busy(2) is False
    # four cores and two threads: two free cores take two others
    reader = RunnableTasks(
        team_ids=lambda threads: [10, 11][:threads], root=str(tmp_path), clock=clock, cores=lambda: 4
    )
    for running, expected in ((3, False), (3, False), (4, False), (4, True)):
        _proc(tmp_path, running=running, states={11: "S"})
        clock.now += 1.5 * REUSE_SECONDS
        assert reader.busy(2) is expected, running


def test_without_a_readable_count_there_is_no_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    asked: list[int] = []

    def team(threads: int) -> list[int]:
        asked.append(threads)
        return [10, 11][:threads]

    reader = RunnableTasks(team_ids=team, root=str(tmp_path / "no proc"), clock=clock)
    for _ in range(_runnable_tasks.FAILURES + 2):
        clock.now += 1.5 * REUSE_SECONDS
        assert reader.busy(2) is None
    assert reader.others(2) is None  # given up: no more tries
    # a team whose ids cannot be had (no compiled library, no OpenMP runtime) is no hint either
    _proc(tmp_path, running=3, states={})
    reader = RunnableTasks(team_ids=lambda threads: [], root=str(tmp_path), clock=clock)
    clock.now += 1.5 * REUSE_SECONDS
    assert reader.busy(2) is None
    assert reader.busy(1) is False  # one thread has no team to name
    monkeypatch.setenv("LIGHTNING_HSU_RUNNABLE_TASKS", "0")
    _proc(tmp_path, running=3, states={11: "S"})
    reader = RunnableTasks(team_ids=lambda threads: [10, 11][:threads], root=str(tmp_path), clock=clock)
    clock.now += 1.5 * REUSE_SECONDS
    assert reader.busy(2) is None


@pytest.mark.skipif(not LINUX_PROC, reason="reads Linux's /proc")
def test_the_team_ids_are_the_callers_openmp_threads() -> None:
    if not _cpu_pairs.ready() or _cpu_pairs._openmp_runtime() is None:
        pytest.skip("no compiled library or no OpenMP runtime to name the team")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ids = _cpu_pairs.team_thread_ids(2)
    finally:
        torch.set_num_threads(previous)
    assert len(ids) == len(set(ids)) == 2
    assert ids[0] == threading.get_native_id()
    assert {str(i) for i in ids} <= set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not LINUX_PROC, reason="reads Linux's /proc")
def test_a_spinning_process_is_another_runnable_task() -> None:
    """With as many threads as allowed cores, a process that spins wants one of them: most readings say so."""
    if not _cpu_pairs.ready() or _cpu_pairs._openmp_runtime() is None:
        pytest.skip("no compiled library or no OpenMP runtime to name the team")
    cores = len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(cores)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        reader = RunnableTasks()
        seen = []
        for _ in range(20):
            seen.append(reader.others(cores))
            time.sleep(0.002)
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(previous)
    assert all(count is not None for count in seen)
    assert sum(count >= 1 for count in seen) >= 15, seen  # type: ignore[operator]


class _Hint:
    """A reader whose answer the test sets."""

    def __init__(self) -> None:
        self.answer: bool | None = False
        self.reads = 0

    def busy(self, threads: int, *, read: bool = True) -> bool | None:
        self.reads += read
        return self.answer


MS = 1e-3
IDLE = {True: 5.5 * MS, False: 10 * MS}  # all threads 0.55x one thread
BUSY = {True: 13 * MS, False: 10 * MS}  # another task on one of the two cores


def test_products_made_while_others_want_a_core_are_the_busy_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chooser keeps the two conditions apart: while the hint says busy its twin measures and chooses (one
    thread), otherwise it does (all threads), and neither's measurements move the other's choice or load. The twin
    holds a load from its start."""
    hint = _Hint()
    monkeypatch.setattr(_runnable_tasks, "READER", hint)
    monkeypatch.setattr(_product_threads, "RUNNABLE_HINT", True)
    clock = _Clock()
    chooser = _product_threads.ProductThreadChooser(clock)
    work = 10**8

    def products(busy: bool, calls: int) -> list[bool]:
        hint.answer = busy
        choices = []
        for _ in range(calls):
            wide = chooser.use_all_threads(work, threads=2)
            start = clock()
            clock.now += (BUSY if busy else IDLE)[wide]
            chooser.record(work, wide, clock() - start)
            choices.append(wide)
        return choices

    for _ in range(3):  # the load comes and goes, as a data-loader worker's within each step
        assert products(False, 12)[-6:] == [True] * 6
        assert not chooser.loaded
        assert products(True, 12)[-6:] == [False] * 6
    twin = chooser.busy_twin
    assert twin is not None and twin.busy_twin is None
    assert chooser.use_all_threads(work, threads=2) is False  # busy: the twin's choice
    # the twin's products all met another task: a load from its start, so the compiled kernel's calls after a
    # one-thread product take one thread too (`_matmul.threads_of_last_product`)
    assert chooser.loaded is twin.loaded is True
    hint.answer = False
    assert chooser.use_all_threads(work, threads=2) is True  # at once, no probe period to wait
    assert chooser.loaded is False
    # without the caller's threads (or with the hint off) nothing is read and the chooser decides alone
    reads = hint.reads
    hint.answer = True
    assert chooser.use_all_threads(work) is True
    monkeypatch.setattr(_product_threads, "RUNNABLE_HINT", False)
    assert chooser.use_all_threads(work, threads=2) is True
    assert hint.reads == reads


def test_small_products_follow_the_latest_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    hint = _Hint()
    monkeypatch.setattr(_runnable_tasks, "READER", hint)
    monkeypatch.setattr(_product_threads, "RUNNABLE_HINT", True)
    chooser = _product_threads.ProductThreadChooser(_Clock())
    chooser.use_all_threads(_product_threads.HINT_MIN_WORK - 1, threads=2)
    assert hint.reads == 0
    chooser.use_all_threads(_product_threads.HINT_MIN_WORK, threads=2)
    assert hint.reads == 1
