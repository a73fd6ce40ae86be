"""Helpers for the tests of the intra-op thread counts (`passes_on_one_thread`, product threads)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def thread_spy(calls: list[int], original: Callable) -> Callable:
    """``original``, recording the intra-op thread count at each call into ``calls``."""

    def wrapped(*args, **kwargs):
        calls.append(torch.get_num_threads())
        return original(*args, **kwargs)

    return wrapped


def operators_and_threads(fn: Callable[[], object]) -> list[tuple[str, int]]:
    """Each operator ``fn`` dispatches, with the intra-op thread count it runs on."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recording(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append((str(func), torch.get_num_threads()))
            return func(*args, **(kwargs or {}))

    with Recording() as recording:
        fn()
    return recording.seen
