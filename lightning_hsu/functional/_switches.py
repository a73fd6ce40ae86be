"""The environment variables that switch the package's kernels and products, read one way.

Each switch is read where it acts (most at each call, so that a test or a benchmark can flip it).
All of them are checked together by `check_switches` when a penalty engine or a monitor is set
up, so a mistyped value stops the run before training instead of at its first step. A value is
compared without case and surrounding spaces; unset or empty means the default, the first choice.
Anything else is refused with an error that names the variable and its choices: a switch that
silently kept its default would look like a measurement of the other path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    """An environment variable that takes one of a few values; ``choices[0]`` is its default."""

    name: str
    choices: tuple[str, ...]

    def read(self) -> str:
        """The variable's value as one of `choices`; a `ValueError` naming it for anything else."""
        raw = os.environ.get(self.name, "")
        value = raw.strip().lower()
        if not value:
            return self.choices[0]
        if value not in self.choices:
            raise ValueError(
                f"{self.name}={raw!r}: choose one of {', '.join(self.choices)} (unset means {self.choices[0]})"
            )
        return value


#: The fused Triton kernel for a block's pair terms (`lightning_hsu.functional._triton_pairs`):
#: ``auto`` for float32 CUDA tensors when Triton imports, ``0`` never, ``always`` for CPU tensors
#: too, which Triton runs only in its interpreter (``TRITON_INTERPRET=1``: the parity tests).
TRITON = Switch("LIGHTNING_HSU_TRITON", ("auto", "0", "always"))
#: The compiled C kernel for a block's pair terms on the CPU (`lightning_hsu.functional._cpu_pairs`):
#: ``auto`` for float32 CPU tensors when it builds and passes its probe, ``0`` never.
CPU_KERNEL = Switch("LIGHTNING_HSU_CPU_KERNEL", ("auto", "0"))
#: The CPU products' library (`lightning_hsu.functional._matmul`): ``auto`` oneDNN on a CPU with
#: AVX-512 that is not Intel's and ``torch.bmm`` elsewhere, ``1`` oneDNN wherever it is available,
#: ``0`` ``torch.bmm`` everywhere.
ONEDNN_MATMUL = Switch("LIGHTNING_HSU_ONEDNN_MATMUL", ("auto", "1", "0"))
#: The products' threads (`lightning_hsu.functional._product_threads`): ``adaptive`` measured
#: online, ``all`` the caller's threads for every product.
PRODUCT_THREADS = Switch("LIGHTNING_HSU_PRODUCT_THREADS", ("adaptive", "all"))

#: The product chooser's hint from the operating system (`lightning_hsu.functional._runnable_tasks`): ``auto``
#: reads the machine's runnable tasks where Linux gives them, ``0`` never (the products' times alone decide).
RUNNABLE_TASKS = Switch("LIGHTNING_HSU_RUNNABLE_TASKS", ("auto", "0"))

SWITCHES = (TRITON, CPU_KERNEL, ONEDNN_MATMUL, PRODUCT_THREADS, RUNNABLE_TASKS)


def check_switches() -> None:
    """Read every switch once, so that a mistyped value is refused now (see `Switch.read`)."""
    for switch in SWITCHES:
        switch.read()
