"""Coefficient schedules over *global* (optimizer) steps.

A schedule maps the trainer's ``global_step`` to a factor that multiplies a rule's coefficient.
Because it reads optimizer steps, not batches, gradient accumulation does not stretch it.
"""

from __future__ import annotations

import math

from lightning_hsu.validation import positive_float, positive_int


class Schedule:
    """Base class: ``factor(step) -> float`` (1.0 means the coefficient as given)."""

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.factor(step)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items()))))


class Constant(Schedule):
    """The coefficient as given, at every step."""

    def factor(self, step: int) -> float:
        return 1.0


class LinearWarmup(Schedule):
    """Linear ramp from ``start_factor`` to 1 over ``warmup_steps`` steps, then constant.

    Examples:
        >>> from lightning_hsu import LinearWarmup
        >>> [LinearWarmup(100).factor(step) for step in (0, 50, 100, 200)]
        [0.0, 0.5, 1.0, 1.0]
    """

    def __init__(self, warmup_steps: int, start_factor: float = 0.0) -> None:
        self.warmup_steps = positive_int("LinearWarmup", "warmup_steps", warmup_steps)
        self.start_factor = positive_float("LinearWarmup", "start_factor", start_factor, allow_zero=True)

    def factor(self, step: int) -> float:
        assert self.warmup_steps is not None
        if step >= self.warmup_steps:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps


class StepDecay(Schedule):
    """Multiply by ``gamma`` every ``step_size`` steps (as ``torch.optim.lr_scheduler.StepLR``).

    Examples:
        >>> from lightning_hsu import StepDecay
        >>> [StepDecay(100, gamma=0.5).factor(step) for step in (0, 100, 250)]
        [1.0, 0.5, 0.25]
    """

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        self.step_size = positive_int("StepDecay", "step_size", step_size)
        self.gamma = positive_float("StepDecay", "gamma", gamma, allow_zero=True)

    def factor(self, step: int) -> float:
        assert self.step_size is not None
        return self.gamma ** (step // self.step_size)


class Cosine(Schedule):
    """Cosine decay from 1 to ``min_factor`` over ``total_steps``, then ``min_factor``.

    Examples:
        >>> from lightning_hsu import Cosine
        >>> [round(Cosine(100).factor(step), 3) for step in (0, 50, 100)]
        [1.0, 0.5, 0.0]
    """

    def __init__(self, total_steps: int, min_factor: float = 0.0) -> None:
        self.total_steps = positive_int("Cosine", "total_steps", total_steps)
        self.min_factor = positive_float("Cosine", "min_factor", min_factor, allow_zero=True)

    def factor(self, step: int) -> float:
        assert self.total_steps is not None
        progress = min(step, self.total_steps) / self.total_steps
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
