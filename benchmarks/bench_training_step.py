"""Training-step time of a CIFAR ResNet-18 with and without the MHE penalty on every conv/linear layer.

ResNet-18 in its CIFAR shape (3x3 stem, no max-pool, 32x32 input; He et al. 2016), batch 64,
SGD. The penalty is ``sum_layers lambda * MHE(neurons_of(layer))``: half-space (s = 2) on the 20
conv layers with lambda = 1, full space on the classifier with lambda = 10 (the official MHE
settings). Variants:

- **per layer**: one ``hyperspherical_energy`` call per layer;
- **batched by shape**: layers with the same ``[n, d]`` stacked into one ``[batch, n, d]`` call;
- **torch.compile**: the per-layer penalty function compiled (compile time reported apart);
- **CUDA graph** (GPU only): the per-layer penalties captured once and replayed
  (:class:`~lightning_hsu.cuda_graphs.GraphedPenalties`, what the callback does on a GPU);
- **Lightning**: one ``Trainer.fit`` with the ``HypersphericalUniformity`` callback
  (``preset="mhe"``, or each of ``--presets``) switched on and off on alternate steps, timed from
  ``on_train_batch_start`` to ``on_train_batch_end``; on a GPU once with its CUDA graphs and once
  with ``cuda_graphs=False``.

Two estimates of the growth: the ratio of the median step times, and the median of the
*paired* ratios (each step against the no-penalty step of the same round, adjacent in time) with
a 95% bootstrap interval, which a slow spell of a shared machine disturbs less.

Usage: ``python benchmarks/bench_training_step.py [--steps 5] [--threads 1] [--device cuda] [--no-lightning]
[--presets mhe,comhe]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import (
    add_common_args,
    apply_threads,
    device_arg,
    machine,
    ms,
    names_of,
    paired_ratio,
    quiet_fit,
    sync,
    table,
)
from torch import nn

from lightning_hsu import MHE
from lightning_hsu.cuda_graphs import GraphedPenalties
from lightning_hsu.functional import hyperspherical_energy, neurons_of
from lightning_hsu.functional._matmul import batched_matmul, gram
from lightning_hsu.rules import PRESETS


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def penalised_layers(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs, model.fc


def penalty_per_layer(model: nn.Module) -> torch.Tensor:
    convs, fc = penalised_layers(model)
    total = sum(hyperspherical_energy(neurons_of(c), half_space=True) for c in convs)
    return total + 10.0 * hyperspherical_energy(neurons_of(fc))


def penalty_batched(model: nn.Module) -> torch.Tensor:
    convs, fc = penalised_layers(model)
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for c in convs:
        w = neurons_of(c)
        groups.setdefault(tuple(w.shape), []).append(w)
    total = sum(hyperspherical_energy(torch.stack(ws), half_space=True).sum() for ws in groups.values())
    return total + 10.0 * hyperspherical_energy(neurons_of(fc))


def graphed_penalty(model: nn.Module):
    """``penalty_per_layer`` replayed from CUDA graphs captured here (no host sync inside)."""
    convs, fc = penalised_layers(model)
    half, full = MHE(half_space=True), MHE()
    penalties = [lambda w: half(neurons_of(w), check_finite=False)] * len(convs)
    penalties.append(lambda w: full(w, check_finite=False))
    graphs = GraphedPenalties(penalties, [c.weight for c in convs] + [fc.weight])
    coefficients = torch.tensor([1.0] * len(convs) + [10.0], device=fc.weight.device)
    return lambda _model: torch.dot(graphs(), coefficients)


def products_alone(model: nn.Module):
    """The floor of any exact penalty: per layer the Gram product and the gradient product ``C W``,
    with the library's own products (symmetric strips and oneDNN on the CPU), nothing else."""
    convs, fc = penalised_layers(model)
    weights = [neurons_of(m).detach().unsqueeze(0) for m in [*convs, fc]]
    coefficients = [torch.randn(1, w.shape[1], w.shape[1], device=w.device) for w in weights]

    def run() -> None:
        for w, c in zip(weights, coefficients, strict=True):
            gram(w)
            batched_matmul(c, w)

    return run


def make_step(model: nn.Module, penalty, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        opt.step()

    return step


def time_steps(steps: dict[str, object], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, one step of each per round, in a rotating order."""
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for k in names:
        steps[k]()  # warm-up
    for rep in range(repeats):
        for k in names[rep % len(names) :] + names[: rep % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            steps[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def growth(times: list[float], base: list[float]) -> list[str]:
    """The table's columns: median step, growth of the medians, paired growth [95% interval]."""
    median, low, high = paired_ratio(times, base)
    paired = f"{100 * (median - 1):+.1f}% [{100 * (low - 1):+.1f}, {100 * (high - 1):+.1f}]"
    of_medians = statistics.median(times) / statistics.median(base)
    return [ms(statistics.median(times)), f"{100 * (of_medians - 1):+.1f}%", paired]


def resnet_module(extra_loss=None):
    """The ResNet-18 as a LightningModule (SGD); ``extra_loss(net)``, when given and not ``None``,
    is added to the loss (a penalty written by hand in ``training_step``)."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ResNet18()

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            extra = None if extra_loss is None else extra_loss(self.net)
            return loss if extra is None else loss + extra

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    return Module()


def lightning_steps(
    device: torch.device,
    steps: int,
    cuda_graphs: bool = True,
    log_per_layer: bool = False,
    preset: str = "mhe",
    *,
    callback: object | None = None,
    module: object | None = None,
    watch: object | None = None,
    hand_written: bool = False,
) -> dict[str, list[float]]:
    """Step times of one ``Trainer.fit`` with the callback switched off and on in turn: ``"off"``
    and ``"callback"``, in rounds of adjacent steps.

    The callback's ``enabled`` flag alternates every step (its hooks stay installed), so both
    medians come from the same process, memory state and minute of a shared machine.
    ``hand_written``: a third step in each round, ``"hand-written"``, with the callback off and
    ``training_step`` adding :func:`penalty_per_layer` itself (the ``mhe`` preset's penalty, eagerly).
    ``callback`` replaces the ``HypersphericalUniformity`` built from the other arguments (any
    callback with an ``enabled`` flag), ``module`` the plain ResNet-18 module;
    ``watch(batch_idx, enabled, phase)`` is called at each step's ``"start"`` and ``"end"``
    (``bench_callback_overhead.py`` profiles single steps with it).
    """
    import lightning.pytorch as pl

    from lightning_hsu import HypersphericalUniformity

    hsu = callback or HypersphericalUniformity(preset=preset, log_per_layer=log_per_layer, cuda_graphs=cuda_graphs)
    if hand_written and module is not None:
        raise ValueError("hand_written builds its own module; pass one or the other")
    modes = ["callback", "off", "hand-written"] if hand_written else ["callback", "off"]
    current = {"mode": modes[0]}
    if hand_written:
        module = resnet_module(lambda net: penalty_per_layer(net) if current["mode"] == "hand-written" else None)

    class Rotate(pl.Callback):
        """Switches the penalty on for one step of each round and times every step."""

        def __init__(self) -> None:
            self.times: dict[str, list[float]] = {mode: [] for mode in modes}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            current["mode"] = modes[batch_idx % len(modes)]
            hsu.enabled = current["mode"] == "callback"
            sync(device)
            if watch is not None:
                watch(batch_idx, hsu.enabled, "start")
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            if batch_idx >= len(modes):  # the first round warms up
                self.times[current["mode"]].append(time.perf_counter() - self.t0)
            if watch is not None:
                watch(batch_idx, hsu.enabled, "end")

    timer = Rotate()
    fit(device, len(modes) * (steps + 1), [timer, hsu], module or resnet_module())
    return timer.times


def fit(device: torch.device, batches: int, callbacks: list, module, batch_size: int = 64) -> None:
    """One epoch of ``batches`` random CIFAR-shaped batches (no logger, checkpoint or bar)."""
    torch.manual_seed(0)
    count = batch_size * batches
    data = torch.utils.data.TensorDataset(torch.randn(count, 3, 32, 32), torch.randint(0, 10, (count,)))
    quiet_fit(module, torch.utils.data.DataLoader(data, batch_size=batch_size), callbacks, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-lightning", action="store_true")
    parser.add_argument(
        "--presets", default="mhe", help="comma-separated presets of the Lightning rows (mhe, comhe, mhs, ...)"
    )
    args = parser.parse_args()
    presets = names_of(parser, "--presets", args.presets, PRESETS)  # checked before any step runs
    apply_threads(args.threads)
    device = device_arg(args.device)
    print(f"Machine: {machine()}\n")
    torch.manual_seed(0)
    model = ResNet18().to(device)
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    with torch.no_grad():
        exact = float(penalty_per_layer(model))
        batched = float(penalty_batched(model))
    assert abs(exact - batched) <= 1e-5 * abs(exact), (exact, batched)

    steps = {
        "no penalty": make_step(model, None, x, y),
        "penalty, per layer": make_step(model, penalty_per_layer, x, y),
        "penalty, batched by shape": make_step(model, penalty_batched, x, y),
    }
    notes = []
    if not args.no_compile:
        try:
            compiled = torch.compile(penalty_per_layer)
            t0 = time.perf_counter()
            make_step(model, compiled, x, y)()
            notes.append(f"torch.compile: first (compiling) step {time.perf_counter() - t0:.1f} s")
            steps["penalty, torch.compile"] = make_step(model, compiled, x, y)
        except Exception as err:  # report, do not fail the benchmark
            notes.append(f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if device.type == "cuda":
        replay = graphed_penalty(model)
        with torch.no_grad():
            replayed = float(replay(model))
        notes.append(f"CUDA graph: penalty {replayed:.4f} (eager {exact:.4f})")
        steps["penalty, CUDA graph (GraphedPenalties)"] = make_step(model, replay, x, y)
    pen_model = ResNet18().to(device)
    pen_time = {
        "penalty alone (forward + backward, per layer)": lambda: penalty_per_layer(pen_model).backward(),
        "penalty alone (batched by shape)": lambda: penalty_batched(pen_model).backward(),
        "its matrix products alone (Gram + gradient product per layer)": products_alone(pen_model),
    }
    times = time_steps({**steps, **pen_time}, device, args.steps)
    base = times["no penalty"]
    rows = [[k, *growth(v, base)] for k, v in times.items()]
    if not args.no_lightning:
        # on a GPU: with graphs, with graphs and the default per-layer logging, without graphs
        variants = [(True, False), (True, True), (False, False)] if device.type == "cuda" else [(True, False)]
        for preset in presets:
            for graphs, per_layer in variants:
                if per_layer and preset != presets[0]:
                    continue  # the logging's cost does not depend on the regulariser
                # on the CPU, the same penalty written in training_step takes turns in the same fit
                by_hand = preset == "mhe" and device.type == "cpu"
                times = lightning_steps(
                    device, args.steps, cuda_graphs=graphs, log_per_layer=per_layer, preset=preset, hand_written=by_hand
                )
                plain = times["off"]
                label = "" if device.type != "cuda" else (", CUDA graphs" if graphs else ", cuda_graphs=False")
                label += ", log_per_layer=True" if per_layer else ""
                off = f"Lightning Trainer, callback switched off (enabled=False){label}"
                on = f"Lightning Trainer + HypersphericalUniformity(preset={preset!r}{label})"
                rows.append([off, ms(statistics.median(plain)), "(its own baseline)", ""])
                if by_hand:
                    rows.append(
                        ["Lightning Trainer, the same penalty in training_step", *growth(times["hand-written"], plain)]
                    )
                rows.append([on, *growth(times["callback"], plain)])
    print(f"### CIFAR ResNet-18 training step, batch 64, {device.type}, median of {args.steps}\n")
    print(table(["variant", "step ms", "vs no penalty", "paired, median [95% interval]"], rows))
    for note in notes:
        print(f"\n{note}")
    groups = {}
    for c in penalised_layers(model)[0]:
        groups.setdefault(tuple(neurons_of(c).shape), 0)
        groups[tuple(neurons_of(c).shape)] += 1
    print(f"\nConv layer shapes [n, d] x count: {groups}; penalty value {exact:.4f} (per layer == batched)")


if __name__ == "__main__":
    main()
