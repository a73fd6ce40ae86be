"""The callback in a Lightning fit whose competing load is its own data-loader worker (issue 20's users).

`bench_contention.py` competes with a spin loop it pins to one core. The load most users have is their
`DataLoader`'s worker, which decodes and augments the next batches while the step runs and sleeps when its
prefetch queue is full. Here one `Trainer.fit` per model and loader setting trains a model of
`bench_real_models.py` (built from a `transformers` config, nothing downloaded) with
`HypersphericalUniformity(preset)`, and the settings below take turns in blocks of ``--block`` steps, their order
rotating from round to round (round 0 is a warm-up). Each block sets the intra-op threads of the step's process
and the library's switches (`bench_contention.set_mode`), each setting with a product chooser of its own on a
clock of its own blocks' time (`_common.OwnClock`):

- **no penalty, 1 thread** / **no penalty, 2 threads**: the callback switched off (``enabled = False``);
- **shipped, 1 thread**: the callback as shipped, at one thread;
- and at two threads each of ``--modes`` (`bench_contention.MODES`), by default **shipped**, **without the
  runnable-task hint** (the products' choice from their times alone, before item 67) and **all-thread products**
  (every product on the caller's threads, ``LIGHTNING_HSU_PRODUCT_THREADS=all``); the runs before item 67 took
  **parallel passes** (also every elementwise pass split over the threads: the code before issue 20) as the third.

The loader settings (``--loaders``):

- **worker**: ``num_workers=--workers`` (persistent, prefetch 2): the augmentation runs in the worker processes
  while the steps run;
- **in the step's process**: ``num_workers=0``: the same augmentation runs between the steps, so nothing of the
  job's own competes with a step (the reference).

The augmentation stands in for a decode-and-augment pipeline: random affine warps (``grid_sample``) of a batch of
3 × 96 × 96 images, then a resize to the model's 32 px; the number of warps is calibrated so that a batch takes
``--augment-ms`` on one thread. With a time per batch near the step's, the worker is busy during most steps; above
it, all of them (the loader is then the bottleneck, and the steps wait for data between them, which the step
times do not count).

A step is timed from ``on_train_batch_start`` to ``on_train_batch_end``. Reported per setting: the median step;
the step against the setting without a penalty at the same threads (median of the per-round ratios, 95%
bootstrap interval); the penalty's milliseconds per step (median of the per-round differences); the step against
"shipped, 1 thread"; and the share of its steps after which its chooser held a load
(`ProductThreadChooser.loaded`: since item 67 that of the chooser or its busy twin, whichever made the step's latest
choice).

Usage: ``python benchmarks/bench_loader_workers.py [--models vit,resnet18] [--preset mhe] [--rounds 10]
[--augment-ms 150] [--loaders worker,main] [--modes shipped,all-thread products]``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    OwnClock,
    machine,
    ms,
    names_of,
    paired_difference,
    paired_ratio,
    quiet_fit,
    table,
)
from bench_contention import MODES, set_mode
from bench_real_models import IMAGE_BATCH, IMAGE_SIZE, ModelSpec, lightning_module, model_specs

from lightning_hsu.functional import _product_threads

#: the settings every run has: setting → (`bench_contention.MODES` mode, or None for the callback switched off;
#: one thread)
BASE_SETTINGS: dict[str, tuple[str | None, bool]] = {
    "no penalty, 1 thread": (None, True),
    "shipped, 1 thread": ("shipped", True),
    "no penalty, 2 threads": (None, False),
}
#: the `bench_contention.MODES` run at two threads by default (``--modes``)
DEFAULT_MODES = ("shipped", "without the runnable-task hint", "all-thread products")


def settings_of(modes: list[str]) -> dict[str, tuple[str | None, bool]]:
    """`BASE_SETTINGS` and each of ``modes`` at two threads."""
    return BASE_SETTINGS | {f"{mode}, 2 threads": (mode, False) for mode in modes}


#: loader setting → (num_workers, ``None`` for ``--workers``; its name in the table)
LOADERS: dict[str, tuple[int | None, str]] = {"worker": (None, "worker"), "main": (0, "in the step's process")}
#: the source images' side before the resize to the model's input
SOURCE_SIZE = 96


def augment(images: torch.Tensor, warps: int, generator: torch.Generator) -> torch.Tensor:
    """``warps`` random affine warps (rotation, scale, shift) of ``images`` ``[b, 3, s, s]``, averaged, resized to
    the model's input side: a stand-in for decoding and augmenting a batch."""
    b = images.shape[0]
    out = torch.zeros_like(images)
    for _ in range(warps):
        angle = (torch.rand(b, generator=generator) - 0.5) * 0.6
        scale = 0.9 + 0.2 * torch.rand(b, generator=generator)
        shift = (torch.rand(b, 2, generator=generator) - 0.5) * 0.2
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = scale * torch.cos(angle), -scale * torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = scale * torch.sin(angle), scale * torch.cos(angle)
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out += F.grid_sample(images, grid, align_corners=False)
    return F.interpolate(out / warps, size=IMAGE_SIZE, mode="bilinear", antialias=True, align_corners=False)


class AugmentedBatches(torch.utils.data.Dataset):
    """``length`` batches of ``IMAGE_BATCH`` augmented images (`augment`, ``warps`` each) with random labels."""

    def __init__(self, length: int, warps: int, classes: int = 10) -> None:
        generator = torch.Generator().manual_seed(0)
        self.source = torch.rand(IMAGE_BATCH, 3, SOURCE_SIZE, SOURCE_SIZE, generator=generator)
        self.labels = torch.randint(0, classes, (IMAGE_BATCH,), generator=generator)
        self.length, self.warps = length, warps

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        return {"pixel_values": augment(self.source, self.warps, generator), "labels": self.labels}


def calibrate_warps(target_seconds: float) -> tuple[int, float]:
    """The number of warps for which one batch takes about ``target_seconds`` on one thread, and that time."""

    def batch_seconds(data: AugmentedBatches, warps: int) -> float:
        data.warps = warps
        start = time.perf_counter()
        for i in range(3):
            data[i]
        return (time.perf_counter() - start) / 3

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a data-loader worker
    try:
        data = AugmentedBatches(3, warps=1)
        batch_seconds(data, 1)  # warm-up
        two, ten = batch_seconds(data, 2), batch_seconds(data, 10)
        per_warp = max((ten - two) / 8, 1e-6)
        warps = max(1, round((target_seconds - (two - 2 * per_warp)) / per_warp))
        return warps, batch_seconds(data, warps)
    finally:
        torch.set_num_threads(threads)


@dataclass
class Fit:
    """Per setting, each round's block time (s), and whether its chooser held a load after each of its steps."""

    settings: dict[str, tuple[str | None, bool]]
    blocks: dict[str, list[float]] = field(init=False)
    loaded: dict[str, list[bool]] = field(init=False)
    layers: int = 0

    def __post_init__(self) -> None:
        self.blocks = {s: [] for s in self.settings}
        self.loaded = {s: [] for s in self.settings}


def measure(
    spec: ModelSpec,
    preset: str,
    settings_by_name: dict[str, tuple[str | None, bool]],
    rounds: int,
    block: int,
    workers: int,
    warps: int,
) -> Fit:
    """One `Trainer.fit` of ``spec`` whose settings take turns in blocks of ``block`` steps."""
    import lightning.pytorch as pl

    from lightning_hsu import HypersphericalUniformity

    hsu = HypersphericalUniformity(preset=preset)
    threads = torch.get_num_threads()
    settings = list(settings_by_name)
    choosers = {s: _product_threads.ProductThreadChooser(OwnClock()) for s in settings}
    fit, current = Fit(settings_by_name), {}

    class Rotate(pl.Callback):
        """Sets each block's threads, switches and chooser; times every step."""

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            round_, position = divmod(batch_idx // block, len(settings))
            setting = settings[(position + round_) % len(settings)]
            mode, one_thread = settings_by_name[setting]
            if batch_idx % block == 0:
                hsu.enabled = mode is not None
                set_mode(mode or "shipped", choosers[setting])
                torch.set_num_threads(1 if one_thread else threads)
                current.update(round=round_, setting=setting, block=0.0)
            current["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            current["block"] += time.perf_counter() - current["t0"]
            if current["round"] == 0:
                return  # warm-up
            setting = current["setting"]
            fit.loaded[setting].append(choosers[setting].loaded)
            if batch_idx % block == block - 1:
                fit.blocks[setting].append(current["block"])

    torch.manual_seed(0)
    module = lightning_module(spec)
    data = AugmentedBatches((rounds + 1) * len(settings) * block, warps)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
    try:
        quiet_fit(module, loader, [Rotate(), hsu], torch.device("cpu"))
    finally:
        set_mode("shipped")
        torch.set_num_threads(threads)
    fit.layers = len(getattr(hsu.engine, "bindings", None) or [])
    return fit


def rows_of(model: str, loader: str, fit: Fit, block: int) -> list[list[object]]:
    rows = []
    for setting, (mode, one_thread) in fit.settings.items():
        blocks = fit.blocks[setting]
        base = fit.blocks[f"no penalty, {'1 thread' if one_thread else '2 threads'}"]
        step = statistics.median(blocks) / block
        if mode is None:
            growth = penalty = "–"
        else:
            growth = "{:.3f} [{:.3f}, {:.3f}]".format(*paired_ratio(blocks, base))
            penalty = "{:.1f} [{:.1f}, {:.1f}]".format(*(ms(v / block) for v in paired_difference(blocks, base)))
        against = "{:.3f} [{:.3f}, {:.3f}]".format(*paired_ratio(blocks, fit.blocks["shipped, 1 thread"]))
        loaded = fit.loaded[setting]
        held = f"{100 * sum(loaded) / len(loaded):.0f}%" if mode is not None and not one_thread else "–"
        rows.append([model, loader, setting, f"{ms(step):.1f}", growth, penalty, against, held])
    return rows


HEADER = [
    "model",
    "loader",
    "setting",
    "step ms",
    "step / no penalty, same threads [95%]",
    "penalty ms a step [95%]",
    "step / shipped, 1 thread [95%]",
    "load held",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    specs = {k: s for k, s in model_specs().items() if s.batch_size == IMAGE_BATCH}
    parser.add_argument("--models", default="vit,resnet18", help=f"comma-separated subset of {list(specs)}")
    parser.add_argument("--preset", default="mhe", help="the callback's preset")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (one block of each setting)")
    parser.add_argument("--block", type=int, default=3, help="consecutive steps per block")
    parser.add_argument("--workers", type=int, default=1, help="num_workers of the 'worker' loader")
    parser.add_argument("--augment-ms", type=float, default=150.0, help="one batch's augmentation on one thread")
    parser.add_argument("--loaders", default="worker,main", help=f"comma-separated subset of {list(LOADERS)}")
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated `bench_contention.MODES` run at two threads, of {list(MODES)}",
    )
    args = parser.parse_args()
    models = names_of(parser, "--models", args.models, specs)
    loaders = names_of(parser, "--loaders", args.loaders, LOADERS)
    settings = settings_of(names_of(parser, "--modes", args.modes, MODES))
    if torch.get_num_threads() < 2:
        parser.error("needs two or more intra-op threads (the settings compare one thread with the default)")

    import lightning

    try:
        import transformers
    except ImportError:
        parser.error("the models are built from `transformers` configs: install it (the test extra has it)")

    transformers.logging.set_verbosity_error()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warps, augment_seconds = calibrate_warps(args.augment_ms / 1000)
    print(f"Command: python {shlex.join(sys.argv)}")
    print(f"Machine: {machine()}, lightning {lightning.__version__}, transformers {transformers.__version__}")
    print(
        f"Started {time.strftime('%Y-%m-%d %H:%M')}; {args.rounds} timed rounds of {len(settings)} blocks × "
        f"{args.block} steps; augmentation {warps} warps a batch, {ms(augment_seconds):.0f} ms on one thread; "
        f"'two threads' = {torch.get_num_threads()}\n"
    )
    rows: list[list[object]] = []
    for model in models:
        for loader in loaders:
            num_workers, loader_name = LOADERS[loader]
            workers = args.workers if num_workers is None else num_workers
            start = time.perf_counter()
            fit = measure(specs[model], args.preset, settings, args.rounds, args.block, workers, warps)
            rows += rows_of(f"{specs[model].description} ({fit.layers} layers)", loader_name, fit, args.block)
            print(f"  {model}, {loader}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(table(HEADER, rows))
    print(
        "\nstep ms: median over rounds of a block's mean step (forward, backward, optimizer step); ratios and "
        "differences: median over rounds of the block against the named setting's block of the same round, 95% "
        "bootstrap interval; load held: share of the setting's steps after which its chooser held a load."
    )


if __name__ == "__main__":
    main()
