r"""Whether other tasks want this machine's cores now, from the operating system (Linux): the product chooser's hint.

The product chooser (`_product_threads`) sees a load only in its products' times, so a load that comes and goes
within a training step (a data-loader worker busy early in each step, idle later) is held across the idle parts
until a probe finds all threads faster again: up to 27 steps on CPU D (``docs/performance.md``, the data-loader
worker). The kernel knows at once: ``/proc/loadavg``'s fourth field counts the tasks runnable now, and
``/proc/self/task/<id>/stat`` says whether each of this process's OpenMP threads is one of them. Other runnable
tasks are that count less the caller and its team's running threads (a team thread spins for a while after each
parallel region). A core is wanted by others when they number more than the allowed cores the caller's threads leave
free: with two cores and two threads, any one.

A reading costs two or three ``pread`` calls on descriptors kept open (on CPU D 10 us in a tight loop, 38-64 us right
after a product, most of it the kernel's writing of the files; a scan of all the process's threads took 165), and
is reused for `REUSE_SECONDS`. Other tasks' short wake-ups make single readings wrong: with nothing else working,
0-18% of readings counted a second runnable task on CPU D. So the machine counts as busy only when two readings in a
row, at least `REUSE_SECONDS` apart, both saw another task.

Where the count cannot be read (not Linux, no ``/proc``, no compiled library to name the team's threads) `busy`
answers ``None`` and the chooser goes on by its products alone; so it does with ``LIGHTNING_HSU_RUNNABLE_TASKS=0``.
In a container ``/proc/loadavg`` is the host's: on a busy host the count is always high, every reading says busy,
and the chooser's busy twin decides as the chooser did before the hint.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from lightning_hsu.functional import _switches

#: A reading is reused this long (s), and a busy reading confirms the previous one only if this much later. (1 ms:
#: hard MHS at 1024 x 512, whose 12 ms call has about ten large products, took 1.025x [1.013, 1.059] the time without
#: the hint under a lasting load on CPU D, a reading costing 38-64 us; a loader worker's spells last 100 ms or more.)
REUSE_SECONDS = 5e-3
#: Failed readings in a row after which the count is taken as unreadable here for the rest of the process.
FAILURES = 3


def _team_thread_ids(threads: int) -> list[int]:
    """The OpenMP team's thread ids (`_cpu_pairs.team_thread_ids`), or none where the library is not there."""
    from lightning_hsu.functional import _cpu_pairs  # imports _matmul, which imports the chooser

    if _switches.CPU_KERNEL.read() == "0" or not _cpu_pairs.ready():
        return []
    return _cpu_pairs.team_thread_ids(threads)


def _allowed_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class RunnableTasks:
    """Readings of the machine's other runnable tasks (see the module docstring).

    ``team_ids`` gives the caller's OpenMP team of a number of threads, the caller first; ``root`` is where
    ``/proc`` is (tests give a directory of their own); ``clock`` times the readings.
    """

    def __init__(
        self,
        team_ids: Callable[[int], list[int]] = _team_thread_ids,
        root: str = "/proc",
        clock: Callable[[], float] = time.perf_counter,
        cores: Callable[[], int] = _allowed_cores,
    ) -> None:
        self._team_ids, self._root, self._clock, self._cores = team_ids, root, clock, cores
        self._loadavg: int | None = None
        self._team: dict[int, list[int]] = {}  # threads -> descriptors of the team's stat files (caller excluded)
        self._failures = 0
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._seen = False  # the latest reading saw another runnable task
        self._busy: bool | None = None

    def others(self, threads: int) -> int | None:
        """Tasks runnable now other than the caller and its team of ``threads``; ``None`` where unreadable."""
        if self._failures >= FAILURES:
            return None
        try:
            if self._loadavg is None:
                self._loadavg = os.open(os.path.join(self._root, "loadavg"), os.O_RDONLY)
            team = self._team.get(threads)
            if team is None:
                team = self._team[threads] = self._open_team(threads)
            # the load line: ``1min 5min 15min running/threads last_pid``
            running = int(os.pread(self._loadavg, 128, 0).split()[3].split(b"/")[0])
            own = 1  # the caller, reading this
            for descriptor in team:
                stat = os.pread(descriptor, 512, 0)
                state = stat.rindex(b")") + 2  # after the command name, which may hold ") "
                own += stat[state : state + 1] == b"R"
        except (OSError, ValueError, IndexError):
            self._close_team()  # a team thread gone (the team was rebuilt): its ids again at the next reading
            self._failures += 1
            return None
        self._failures = 0
        return running - own

    def _open_team(self, threads: int) -> list[int]:
        ids = self._team_ids(threads)
        if threads > 1 and len(ids) != threads:
            raise OSError(f"no thread ids of the OpenMP team of {threads}")
        return [os.open(os.path.join(self._root, "self", "task", str(i), "stat"), os.O_RDONLY) for i in ids[1:]]

    def _close_team(self) -> None:
        for team in self._team.values():
            for descriptor in team:
                os.close(descriptor)
        self._team.clear()

    def busy(self, threads: int, *, read: bool = True) -> bool | None:
        """Whether other runnable tasks want a core that a team of ``threads`` would use: two readings in a row
        at least `REUSE_SECONDS` apart saw more of them than the allowed cores less ``threads``. ``None`` where the
        count is not read (`_switches.RUNNABLE_TASKS` ``0``, or not readable here). With ``read=False``, or within
        `REUSE_SECONDS` of the latest reading, the latest answer."""
        now = self._clock()
        if not read or now - self._read_at < REUSE_SECONDS:
            return self._busy
        if _switches.RUNNABLE_TASKS.read() == "0":
            self._busy = None
            return None
        with self._lock:
            others = self.others(threads)
            if others is None:
                self._busy = None
                return None
            seen = others > self._cores() - threads
            self._busy, self._seen, self._read_at = seen and self._seen, seen, now
            return self._busy


#: The process's reader, asked by the chooser (`_product_threads`).
READER = RunnableTasks()
