"""A competing busy process pinned to one core, started and stopped by the benchmark itself.

`BusyCore` spawns one process that sets its affinity to a single core
(``os.sched_setaffinity``) and spins pure Python there while switched on, so the benchmarked
process shares that core with a runnable competitor, as on a busy host. It sleeps while switched
off, exits when closed, when its parent dies, and by itself after ``max_seconds``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from types import TracebackType


def _spin(core: int, switch: mp.synchronize.Event, stop: mp.synchronize.Event, max_seconds: float) -> None:
    os.sched_setaffinity(0, {core})
    parent = os.getppid()
    deadline = time.monotonic() + max_seconds
    x = 0
    while not stop.is_set() and time.monotonic() < deadline and os.getppid() == parent:  # parent killed: exit
        if not switch.wait(0.1):
            continue
        for _ in range(20000):  # ~1 ms of spinning between checks of the switch
            x += 1


class BusyCore:
    """``with BusyCore(core=0) as busy: busy.on(); ...; busy.off()``: a competitor on one core."""

    def __init__(self, core: int = 0, max_seconds: float = 3600.0) -> None:
        if core not in os.sched_getaffinity(0):
            raise ValueError(f"core {core} is not available to this process")
        ctx = mp.get_context("spawn")  # no fork of a process holding an OpenMP pool
        self._switch = ctx.Event()
        self._stop = ctx.Event()
        self._process = ctx.Process(target=_spin, args=(core, self._switch, self._stop, max_seconds), daemon=True)
        self.core = core

    def __enter__(self) -> BusyCore:
        self._process.start()
        return self

    def on(self) -> None:
        self._switch.set()
        time.sleep(0.05)  # let it be scheduled and spinning before the timed call

    def off(self) -> None:
        self._switch.clear()
        time.sleep(0.02)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._switch.set()
        self._process.join(5.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5.0)
