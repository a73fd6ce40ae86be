"""NaN/inf checks of the penalties of a step: one test for all of them, now or deferred.

A non-finite penalty must be stopped before it reaches the weights. Testing each value on its own
is a host synchronisation per layer; `FiniteChecks` tests the values of a step together,
either at once (the CPU: one synchronisation), or deferred (a GPU): the test runs on the device
and its answer is copied to pinned host memory without waiting, then read before the optimizer
steps. Pure PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: What is checked: ``(global step, binding key, value)``.
Entry = tuple[int, str, Tensor]


class NonFinitePenaltyError(FloatingPointError):
    """A layer's penalty was NaN or inf; raised before it can reach the weights."""


@dataclass
class _Pending:
    """Values whose test is under way: ``finite`` (on the host) is complete once ``ready`` is."""

    entries: list[Entry]
    finite: Tensor
    ready: torch.cuda.Event | None


def _finite(entries: list[Entry]) -> Tensor:
    return torch.isfinite(torch.stack([value.reshape(()).float() for _, _, value in entries]))


class FiniteChecks:
    """The NaN/inf tests of penalty values, at once or queued until `finish`."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []

    def first_nonfinite(self, entries: list[Entry]) -> Entry | None:
        """The first non-finite entry, tested now (one host synchronisation for all of them)."""
        return _first(entries, _finite(entries)) if entries else None

    def defer(self, entries: list[Entry]) -> None:
        """Test ``entries`` on their device and copy the answer to the host without waiting; an
        event marks its arrival, which waits for the penalties' forward only, not for the work
        queued after it."""
        if not entries:
            return
        finite = _finite(entries)
        if not finite.is_cuda:
            self._pending.append(_Pending(entries, finite, None))
            return
        host = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self._pending.append(_Pending(entries, host, ready))

    @property
    def oldest_step(self) -> int | None:
        """The global step of the oldest deferred test (``None``: none is queued)."""
        return self._pending[0].entries[0][0] if self._pending else None

    def finish(self) -> Entry | None:
        """Wait for the deferred tests and return the first non-finite entry (``None``: all finite)."""
        pending, self._pending = self._pending, []
        for check in pending:
            if check.ready is not None:
                check.ready.synchronize()
        entries = [entry for check in pending for entry in check.entries]
        if not entries:
            return None
        return _first(entries, torch.cat([check.finite for check in pending]))


def _first(entries: list[Entry], finite: Tensor) -> Entry | None:
    if bool(finite.all()):
        return None
    return entries[int((~finite).nonzero()[0])]
