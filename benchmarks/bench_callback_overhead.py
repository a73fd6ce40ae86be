"""Where the callback's step time goes, beyond the penalties themselves (an ablation).

On a GPU the CIFAR ResNet-18 step with the penalties replayed from CUDA graphs grew by +4.9% when
written by hand in a plain loop but by +23% through the callback (``docs/performance.md``). Each
row below is one ``Trainer.fit`` of the ResNet-18 of ``bench_training_step.py`` with the penalty
switched on and off on alternate steps, the growth paired per round:

- **hand-written**: ``training_step`` adds the same graphed penalties itself
  (``bench_training_step.graphed_penalty``): what Lightning alone adds to the plain loop's number;
- **callback**: ``HypersphericalUniformity(preset)``, as a user adds it;
- **callback, one graph call per layer**: the layers of one shape not batched into one call
  inside the CUDA graphs (``PenaltyEngine.BATCH_GRAPHS``);
- **callback, log=False**: without its logging of ``hsu/penalty``;
- **callback, log=False, no NaN check**: also without the check that non-finite penalties raise
  before the optimizer step (one host synchronisation on a GPU). An ablation only: a user cannot
  switch that check off.

Then one step with the callback on and one with it off are profiled (``torch.profiler``): how many
times each CUDA runtime call (kernel and graph launches, synchronisations, copies) and each
operator ran, the rows that differ.

Usage: ``python benchmarks/bench_callback_overhead.py [--device cuda] [--steps 20] [--preset mhe]``.
"""

from __future__ import annotations

import argparse
import collections
import warnings

import torch
from _common import add_common_args, apply_threads, device_arg, machine, table
from bench_training_step import graphed_penalty, growth, lightning_steps, resnet_module


class Flag:
    """Stands in for the callback where the penalty is hand-written: the timer alternates ``enabled``."""

    enabled = True


def ablation_rows(device: torch.device, steps: int, preset: str) -> list[list[object]]:
    import lightning.pytorch as pl

    from lightning_hsu import HypersphericalUniformity

    rows: list[list[object]] = []
    flag = type("HandWritten", (Flag, pl.Callback), {})()
    replay = {}

    def hand_written(net: torch.nn.Module) -> torch.Tensor | None:
        if not flag.enabled:
            return None
        if "graphs" not in replay:
            replay["graphs"] = graphed_penalty(net) if device.type == "cuda" else None
        graphs = replay["graphs"]
        if graphs is None:  # the CPU has no graphs: the same MHE penalty, eagerly
            from bench_training_step import penalty_per_layer

            return penalty_per_layer(net)
        return graphs(net)

    unbatched = HypersphericalUniformity(preset=preset)
    unbatched.engine.BATCH_GRAPHS = False
    unchecked = HypersphericalUniformity(preset=preset, log=False)
    unchecked.engine.check_finite_pending = lambda: None  # the ablation: never do in real training
    unchecked.on_before_optimizer_step = lambda *args: None
    variants = {
        "hand-written in training_step (MHE, graphs on a GPU)": dict(callback=flag, module=resnet_module(hand_written)),
        f"callback, preset={preset!r}": dict(callback=HypersphericalUniformity(preset=preset)),
        f"callback, preset={preset!r}, one graph call per layer (ablation)": dict(callback=unbatched),
        f"callback, preset={preset!r}, log=False": dict(callback=HypersphericalUniformity(preset=preset, log=False)),
        f"callback, preset={preset!r}, log=False, no NaN check (ablation)": dict(callback=unchecked),
    }
    for name, kwargs in variants.items():
        plain, with_penalty = lightning_steps(device, steps, **kwargs)
        rows.append([name, *growth(with_penalty, plain)])
    return rows


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
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and setting")
    parser.add_argument("--preset", default="mhe")
    args = parser.parse_args()
    apply_threads(args.threads)
    device = device_arg(args.device)
    print(f"Machine: {machine()}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = ablation_rows(device, args.steps, args.preset)
        counts = profiled_counts(device, args.preset)
    print(f"### CIFAR ResNet-18 step in Lightning, batch 64, {device.type}: growth with the penalty\n")
    print(table(["variant", "step ms", "vs off", "paired, median [95% interval]"], rows))
    on, off = counts[True], counts[False]
    runtime = sorted(k for k in on.keys() | off.keys() if k.startswith("cuda") and on[k] != off[k])
    print(f"\n### One step profiled, callback preset={args.preset!r} on and off: CUDA runtime calls that differ\n")
    print(table(["call", "on", "off"], [[k, on[k], off[k]] for k in runtime]) if runtime else "(none: no CUDA)")
    ops = sorted(
        (k for k in on.keys() | off.keys() if not k.startswith("cuda") and on[k] != off[k]),
        key=lambda k: -abs(on[k] - off[k]),
    )[:25]
    print("\n### The same steps: operators and functions that ran a different number of times (25 largest)\n")
    print(table(["event", "on", "off"], [[k, on[k], off[k]] for k in ops]))


if __name__ == "__main__":
    main()
