"""Where the callback's step time goes, beyond the penalties themselves (an ablation).

On a GPU the CIFAR ResNet-18 step with the penalties replayed from CUDA graphs grew by +4.9% when
written by hand in a plain loop but by +23% through the callback (``docs/performance.md``). Rows,
on the ResNet-18 of ``bench_training_step.py``:

- **hand-written**: ``training_step`` adds the same graphed penalties itself
  (``bench_training_step.graphed_penalty``), switched on and off on alternate steps of its own
  ``Trainer.fit``: what Lightning alone adds to the plain loop's number;
- then one ``Trainer.fit`` with ``HypersphericalUniformity(preset)`` whose settings take turns,
  one step each (:data:`MODES`), each paired with the callback-off step of its round:
  **callback** as a user adds it; **one graph call per layer** (the layers of one shape not
  batched into one call inside the CUDA graphs, ``GraphReplay.batch``); **log=False**
  (without its logging of ``hsu/penalty``); **log=False, no NaN check** (also without the check
  that non-finite penalties raise before the optimizer step; an ablation only, a user cannot
  switch that check off).

Then one step with the callback on and one with it off are profiled (``torch.profiler``): how many
times each CUDA runtime call (kernel and graph launches, synchronisations, copies) and each
operator ran, the rows that differ.

Usage: ``python benchmarks/bench_callback_overhead.py [--device cuda] [--steps 20] [--presets mhe,comhe]``
(one rotating fit per preset; the profiled steps use the first).
"""

from __future__ import annotations

import argparse
import collections
import time
import warnings

import torch
from _common import add_common_args, apply_threads, device_arg, machine, names_of, sync, table
from bench_training_step import fit, graphed_penalty, growth, lightning_steps, penalty_per_layer, resnet_module

from lightning_hsu.rules import PRESETS


class Flag:
    """Stands in for the callback where the penalty is hand-written: the timer alternates ``enabled``."""

    enabled = True


#: The callback's settings taken in turn, one step each, within one ``Trainer.fit``: between fits
#: (fresh processes, caches, clocks) the same code measured +20% and +34% on the H200, more than
#: the effects compared here; within one fit each setting is paired with the "off" step of its round.
MODES = (
    "off",
    "as a user adds it",
    "one graph call per layer (ablation)",
    "log=False",
    "log=False, no NaN check (ablation)",
)


def set_mode(callback, mode: str) -> None:
    """Switch ``callback`` (a ``HypersphericalUniformity``) to ``mode`` for the next step."""
    engine = callback.engine
    callback.enabled = mode != "off"
    engine.graphs.batch = not mode.startswith("one graph call per layer")
    callback.log = not mode.startswith("log=False")
    if "no NaN check" in mode:
        # the ablation: never do this in real training (a NaN penalty would reach the weights)
        engine.check_finite_pending = engine._unchecked.clear
    else:
        vars(engine).pop("check_finite_pending", None)


def rotation_rows(device: torch.device, rounds: int, preset: str) -> list[list[object]]:
    """One fit, the :data:`MODES` in turn; the growth of each against the "off" step of its round."""
    import lightning.pytorch as pl

    from lightning_hsu import HypersphericalUniformity

    callback = HypersphericalUniformity(preset=preset)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    warm_up = 2  # rounds: the captures (one per grouping) happen in the first

    class Rotate(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            set_mode(callback, MODES[batch_idx % len(MODES)])
            sync(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            if batch_idx >= warm_up * len(MODES):
                times[MODES[batch_idx % len(MODES)]].append(time.perf_counter() - self.t0)

    fit(device, (rounds + warm_up) * len(MODES), [Rotate(), callback], resnet_module())
    return [[f"callback (preset={preset!r}), {mode}", *growth(times[mode], times["off"])] for mode in MODES[1:]]


def hand_written_rows(device: torch.device, steps: int) -> list[list[object]]:
    """The same graphed MHE penalties written by hand in ``training_step`` (its own fit)."""
    import lightning.pytorch as pl

    flag = type("HandWritten", (Flag, pl.Callback), {})()
    replay = {}

    def hand_written(net: torch.nn.Module) -> torch.Tensor | None:
        if not flag.enabled:
            return None
        if "graphs" not in replay:
            replay["graphs"] = graphed_penalty(net) if device.type == "cuda" else None
        graphs = replay["graphs"]
        if graphs is None:  # the CPU has no graphs: the same MHE penalty, eagerly
            return penalty_per_layer(net)
        return graphs(net)

    times = lightning_steps(device, steps, callback=flag, module=resnet_module(hand_written))
    row = "hand-written in training_step (MHE, graphs on a GPU; its own fit)"
    return [[row, *growth(times["callback"], times["off"])]]


def profiled_counts(device: torch.device, preset: str) -> dict[bool, collections.Counter]:
    """Per profiled step (penalty on: True, off: False), how often each event ran."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_hsu import HypersphericalUniformity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    counts: dict[bool, collections.Counter] = {}
    active: dict[str, object] = {}
    first = 6  # after the capture and the warm-up steps

    def watch(batch_idx: int, enabled: bool, phase: str) -> None:
        if batch_idx not in (first, first + 1):
            return
        if phase == "start":
            active["profile"] = profile(activities=activities)
            active["profile"].__enter__()
        else:
            prof = active.pop("profile")
            prof.__exit__(None, None, None)
            counts[enabled] = collections.Counter({e.key: e.count for e in prof.key_averages()})

    lightning_steps(device, 4, callback=HypersphericalUniformity(preset=preset), watch=watch)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (rounds) per setting")
    parser.add_argument("--presets", default="mhe", help="comma-separated presets, one rotating fit each")
    args = parser.parse_args()
    presets = names_of(parser, "--presets", args.presets, PRESETS)
    apply_threads(args.threads)
    device = device_arg(args.device)
    print(f"Machine: {machine()}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = hand_written_rows(device, args.steps)
        for preset in presets:
            rows += rotation_rows(device, args.steps, preset)
        counts = profiled_counts(device, presets[0])
    print(f"### CIFAR ResNet-18 step in Lightning, batch 64, {device.type}: growth with the penalty\n")
    print(table(["variant", "step ms", "vs off", "paired, median [95% interval]"], rows))
    on, off = counts[True], counts[False]
    runtime = sorted(k for k in on.keys() | off.keys() if k.startswith("cuda") and on[k] != off[k])
    print(f"\n### One step profiled, callback preset={presets[0]!r} on and off: CUDA runtime calls that differ\n")
    print(table(["call", "on", "off"], [[k, on[k], off[k]] for k in runtime]) if runtime else "(none: no CUDA)")
    ops = sorted(
        (k for k in on.keys() | off.keys() if not k.startswith("cuda") and on[k] != off[k]),
        key=lambda k: -abs(on[k] - off[k]),
    )[:25]
    print("\n### The same steps: operators and functions that ran a different number of times (25 largest)\n")
    print(table(["event", "on", "off"], [[k, on[k], off[k]] for k in ops]))


if __name__ == "__main__":
    main()
