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
