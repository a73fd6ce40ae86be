"""Shared helpers of the benchmark scripts: timing, machine description, markdown tables.

Timing: each method is run once per repeat, the methods interleaved in a rotating order so that a
slow spell of a shared machine hits them alike; the median over repeats is reported, both in wall
time and (CPU only) in process CPU time, which is less sensitive to other tenants. Compare ratios
taken in the same run, never absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, ROOT)


@dataclass
class Timing:
    wall: float
    cpu: float
    peak_bytes: int | None = None
    walls: list[float] | None = None  # every repeat, in round order (for paired ratios)


class OwnClock:
    """``time.perf_counter`` that stands still while paused: a product chooser's clock that runs only in the calls of
    its own arm or mode, so that its probe periods and a load's age are in that arm's time, not in the time of the
    other arms rotating with it (`_arms.Arm`, `bench_contention.set_mode`). It starts paused."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.paused_at: float | None = time.perf_counter()

    def __call__(self) -> float:
        return (self.paused_at or time.perf_counter()) - self.offset

    def resume(self) -> None:
        if self.paused_at is not None:
            self.offset += time.perf_counter() - self.paused_at
            self.paused_at = None

    def pause(self) -> None:
        if self.paused_at is None:  # pausing twice must not count the time between
            self.paused_at = time.perf_counter()


def half_gram_products(x: torch.Tensor, mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
    """The upper strips ``X_I X_{J >= I}^T`` (128 rows) of the Gram matrix of ``[batch, n, d]`` rows:
    the Gram products the pair sums compute (``gram`` and the strip schedule), without mirroring.

    ``mm``: a product of two matrices (``torch.mm``); default the library's ``batched_matmul``.
    """
    from lightning_hsu.functional._matmul import GRAM_STRIP_ROWS, batched_matmul

    n = x.shape[-2]
    for start in range(0, n, GRAM_STRIP_ROWS):
        stop = min(start + GRAM_STRIP_ROWS, n)
        if mm is None:
            batched_matmul(x[:, start:stop], x[:, start:].transpose(1, 2))
        else:
            for i in range(x.shape[0]):
                mm(x[i, start:stop], x[i, start:].T)


def quiet_fit(module, loader, callbacks: list, device: torch.device) -> None:
    """One epoch of ``loader`` through a Lightning ``Trainer`` without logger, checkpoint, bar,
    model summary or warnings: only the callbacks' own measurements."""
    import warnings

    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(
    methods: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, Timing]:
    """Median wall/CPU seconds per method, interleaved; peak CUDA memory of one call on CUDA."""
    names = list(methods)
    walls: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, list[float]] = {k: [] for k in names}
    peaks: dict[str, int | None] = dict.fromkeys(names)
    for name in names:
        for _ in range(warmup):
            methods[name]()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            methods[name]()
            sync(device)
            peaks[name] = torch.cuda.max_memory_allocated(device) - base
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            methods[name]()
            sync(device)
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    return {k: Timing(statistics.median(walls[k]), statistics.median(cpus[k]), peaks[k], walls[k]) for k in names}


def bootstrap_median(values: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """The median of ``values`` and a 95% bootstrap interval of it (seeded: reproducible for given values)."""
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(values), (resamples, len(values)), generator=generator)
    medians = torch.tensor(values, dtype=torch.float64)[picks].median(dim=1).values.sort().values
    low, high = float(medians[int(0.025 * resamples)]), float(medians[int(0.975 * resamples) - 1])
    return statistics.median(values), low, high


def paired_ratio(
    numerators: list[float], denominators: list[float], resamples: int = 2000
) -> tuple[float, float, float]:
    """Median of the per-round ratios ``numerators[i] / denominators[i]`` and a 95% bootstrap interval.

    Each pair was timed in the same round (adjacent in time), so a slow spell of a shared machine
    cancels within the pair instead of widening the gap between two medians. Seeded: the interval
    of a given list of timings is reproducible.
    """
    return bootstrap_median([a / b for a, b in zip(numerators, denominators, strict=True)], resamples)


def paired_difference(
    minuends: list[float], subtrahends: list[float], resamples: int = 2000
) -> tuple[float, float, float]:
    """Median of the per-round differences ``minuends[i] - subtrahends[i]`` and a 95% bootstrap interval
    (what one setting adds to another timed in the same round, e.g. a penalty's milliseconds in a step)."""
    return bootstrap_median([a - b for a, b in zip(minuends, subtrahends, strict=True)], resamples)


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (a VM's ``lscpu`` may name only "AMD EPYC",
    which covers several generations: family 25 model 1 is Zen 3, 25/17 Zen 4, 26 Zen 5)."""
    fields: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("Model name") or platform.processor() or platform.machine()
    if "CPU family" in fields and "Model" in fields:
        name += f" (family {fields['CPU family']}, model {fields['Model']})"
    return name


def machine() -> str:
    """One line: CPU model and cores (or GPU name), torch version, threads."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads{gpu}, Python {platform.python_version()}"
    )


#: glibc ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_heap() -> str:
    """Keep glibc's heap from shrinking between calls, for this process; returns what was set.

    By default glibc returns the free top of the heap to the kernel once it exceeds the trim
    threshold (about twice the largest block freed so far), and the next call's allocations fault
    its pages in again (``docs/performance.md``, item 38). A trim threshold of 1 GiB and an mmap
    threshold of 32 MiB (glibc's largest) keep them; what ``MALLOC_TRIM_THRESHOLD_`` and
    ``MALLOC_MMAP_THRESHOLD_`` set at start-up. Linux with glibc only.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        raise RuntimeError(f"steady_heap: needs Linux with glibc, not {platform.system()} {platform.libc_ver()}")
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not (libc.mallopt(_M_TRIM_THRESHOLD, 2**30) and libc.mallopt(_M_MMAP_THRESHOLD, 2**25)):
        raise RuntimeError("steady_heap: glibc refused mallopt")
    return "glibc heap kept: trim threshold 1 GiB, mmap threshold 32 MiB"


def table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> float:
    return 1000.0 * seconds


def mib(n_bytes: int | None) -> str:
    return "–" if n_bytes is None else f"{n_bytes / 2**20:.1f}"


def add_common_args(parser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (CPU; default: PyTorch's). The pair sums run their elementwise passes on "
        "one thread and only their products on all (docs/performance.md, a busy CPU); the official "
        "port and other code still end every parallel op at the pool's barrier",
    )


def names_of(parser: argparse.ArgumentParser, option: str, text: str, choices: Iterable[str]) -> list[str]:
    """The names in ``option``'s comma-separated ``text``, or the parser's error naming the ones not in ``choices``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = list(choices)
    if unknown := sorted(set(names) - set(known)):
        parser.error(f"{option}: unknown {unknown}; choose from {known}")
    return names


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def device_arg(value: str) -> torch.device:
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return device
