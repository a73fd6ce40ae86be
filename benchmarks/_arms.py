"""Arms that take turns in blocks of back-to-back calls, each with a product chooser on a clock of its own time.

Rotating arms within one process lets them share the host's minute. Each arm's chooser
(`lightning_hsu.functional._product_threads.ProductThreadChooser`) reads `_common.OwnClock`, which stands still
during the other arms' blocks: on the wall clock its probe periods and a load's age would run during
them too, and with four arms a period of 4 s came to about one probe per block of the arm's own
(item 65's first run, `results_cpu_d_item65.md`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from _common import OwnClock
from bench_contention import set_mode

from lightning_hsu.functional import _product_threads


class Arm:
    """One arm: `bench_contention.MODES` ``mode``, one thread or the caller's, and its own chooser and clock."""

    def __init__(self, name: str, mode: str, one_thread: bool = False) -> None:
        self.name, self.mode, self.one_thread = name, mode, one_thread
        self.clock = OwnClock()
        self.chooser = _product_threads.ProductThreadChooser(self.clock)

    def block(self, call: Callable[[], None], seconds: float, threads: int, loaded: list[bool]) -> float:
        """Back-to-back ``call``s for ``seconds`` in this arm's mode; seconds per call. Appends to ``loaded``
        whether the chooser held a load after each call. The caller restores the mode (`set_mode`)."""
        set_mode(self.mode, self.chooser)  # starts the arm's clock
        torch.set_num_threads(1 if self.one_thread else threads)
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            call()
            calls += 1
            loaded.append(self.chooser.loaded)
        self.clock.pause()
        return (time.perf_counter() - start) / calls


def rotated(arms: list[Arm], round_index: int) -> list[Arm]:
    """The arms in round ``round_index``'s order: each round starts one arm later."""
    shift = round_index % len(arms)
    return arms[shift:] + arms[:shift]
