"""The fused Triton kernel of the pair sums (issue 19): per layer, and in a Lightning step.

**Per layer** (``--part layers``), forward + backward, for half-space MHE (s = 2), full-space MHE,
half-space hard MHS, half-space CoMHE (20 projections to 40 dims) and full-space uniformity
(t = 2), from 64 to 4096 neurons (d = 9n up to 512, then 512; half-space MHE at 512 x 4608 first),
each called as the callback calls it on a GPU (``check_finite=False``):

- **fused** / **eager path**: the package with ``LIGHTNING_HSU_TRITON`` unset (the Triton kernel)
  and ``=0`` (the eager passes it replaces), each called eagerly and **replayed** from a CUDA graph
  (`GraphedPenalties`, what the callback runs);
- **products**: the floor, the Gram product and the gradient product per layer (CoMHE: the
  projections forward and backward and ``K`` of each), float32 without TF32;
- **official**: the official formulation ported to PyTorch (``bench_kernels.py``; uniformity:
  Wang & Isola's ``pdist(x).pow(2).mul(-t).exp().mean().log()``), eagerly; and (``--part
  compile``, a table of its own, last because compiling is slow) under ``torch.compile``, one
  compiled function per regulariser across sizes, as a user would write it (compiled in the
  warm-up, not timed).

Medians of interleaved repeats (``_common.time_methods``); ratios with 95% intervals are paired
per round. Targets of the issue: fused / products <= 1.5 (replayed or eager), official / fused
>= 4, compiled official / fused >= 2.

**Step** (``--part step``): one ``Trainer.fit`` of the CIFAR ResNet-18 of
``bench_training_step.py`` per batch size (64 and 256), the settings rotating step by step: no
penalty; the callback (``preset="mhe"``, CUDA graphs) on the eager path; the same on the fused
kernel (two graph captures, one per setting, swapped in); and the **products only** (per
regularised layer the Gram product forward and the gradient product backward, written in
``training_step``). Each step is paired with the no-penalty step of its round. Target: the
callback's growth within 1.3x the products' growth.

``--smoke``: tiny sizes and few repeats, to check the script on a CPU (with ``TRITON_INTERPRET=1``
the fused rows run in Triton's interpreter, otherwise they take the eager fallback).

Usage: ``python benchmarks/bench_fused.py [--device cuda] [--part layers|step|compile|all] [--smoke]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from _common import add_common_args, apply_threads, device_arg, machine, ms, paired_ratio, sync, table, time_methods
from bench_kernels import dim_for, official_comhe, official_mhe, official_mhs
from bench_training_step import fit, growth, penalised_layers, resnet_module

from lightning_hsu.cuda_graphs import GraphedPenalties, GraphReplay
from lightning_hsu.functional import (
    compressive_energy,
    hyperspherical_energy,
    hyperspherical_separation,
    uniformity,
)
from lightning_hsu.functional._matmul import batched_matmul
from lightning_hsu.functional.pairwise import TRITON_ENV

#: The regularisers of the per-layer table: (name, space).
KINDS = (("MHE", "half"), ("MHE", "full"), ("MHS", "half"), ("CoMHE", "half"), ("uniformity", "full"))
PROJECTIONS = (20, 40)  # CoMHE: K projections to p dimensions (the official best on CIFAR-100)


@contextlib.contextmanager
def triton_mode(mode: str) -> Iterator[None]:
    """``LIGHTNING_HSU_TRITON`` set to ``mode`` inside (read at each pair sum, and at capture)."""
    previous = os.environ.get(TRITON_ENV)
    os.environ[TRITON_ENV] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TRITON_ENV, None)
        else:
            os.environ[TRITON_ENV] = previous


def fused_mode(device: torch.device) -> str:
    """The setting that selects the Triton kernel: ``auto`` on CUDA, ``always`` on the CPU (interpreter)."""
    return "auto" if device.type == "cuda" else "always"


def official_uniformity(w: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """``ssnl/align_uniform``'s ``uniform_loss`` of the normalised rows."""
    x = torch.nn.functional.normalize(w, dim=-1)
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def ours(kind: str, half_space: bool, projections: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The package's penalty as the callback calls it on a GPU (no host sync)."""
    if kind == "MHE":
        return functools.partial(hyperspherical_energy, half_space=half_space, check_finite=False)
    if kind == "MHS":
        return functools.partial(hyperspherical_separation, half_space=half_space, check_finite=False)
    if kind == "CoMHE":
        return functools.partial(compressive_energy, projections=projections, half_space=half_space, check_finite=False)
    return functools.partial(uniformity, t=2.0, half_space=half_space, check_finite=False)


def official(kind: str, half_space: bool, projections: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind == "MHE":
        return functools.partial(official_mhe, half_space=half_space)
    if kind == "MHS":
        return functools.partial(official_mhs, half_space=half_space)
    if kind == "CoMHE":
        return functools.partial(official_comhe, projections=projections, half_space=half_space)
    return official_uniformity


def products(kind: str, w: torch.Tensor, projections: torch.Tensor | None) -> Callable[[], None]:
    """The Gram product and the gradient product of the layer (CoMHE: of each projection, and the
    projections forward and backward), float32, with the package's product function."""
    x = w.detach().unsqueeze(0)
    n = x.shape[1]
    if kind != "CoMHE":
        coefficients = torch.zeros(1, n, n, device=w.device)
        return lambda: (batched_matmul(x, x.transpose(1, 2)), batched_matmul(coefficients, x))
    assert projections is not None
    count, dim, _ = projections.shape
    stacked = projections.reshape(1, count * dim, -1)
    coefficients = torch.zeros(count, n, n, device=w.device)

    def run() -> None:
        projected = batched_matmul(x, stacked.transpose(1, 2)).view(n, count, dim).transpose(0, 1)
        batched_matmul(projected, projected.transpose(1, 2))
        grad = batched_matmul(coefficients, projected)
        batched_matmul(grad.transpose(0, 1).reshape(1, n, count * dim), stacked)

    return run


def backward_of(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, mode: str) -> Callable[[], None]:
    def run() -> None:
        w.grad = None
        with triton_mode(mode):
            fn(w).backward()

    return run


def replayed(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, mode: str) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph with the given setting (the setting counts at capture only)."""
    with triton_mode(mode):
        graphs = GraphedPenalties([fn], [w])

    def run() -> None:
        w.grad = None
        graphs().sum().backward()

    return run


def ratio(r: dict, num: str, den: str) -> str:
    a, b = r["walls"].get(num), r["walls"].get(den)
    if not a or not b:
        return "–"
    if len(a) < 3:
        return f"{statistics.median(a) / statistics.median(b):.3g}"
    median, low, high = paired_ratio(a, b)
    return f"{median:.3g} [{low:.3g}, {high:.3g}]"


def layer_case(kind: str, space: str, n: int, d: int, device: torch.device, repeats: int, compiled=None) -> dict:
    torch.manual_seed(0)
    half_space = space == "half"
    w = torch.randn(n, d, device=device, requires_grad=True)
    projections = torch.randn(*PROJECTIONS, d, device=device) if kind == "CoMHE" else None
    fn = ours(kind, half_space, projections)
    fused = fused_mode(device)
    methods: dict[str, Callable[[], object]] = {}
    if compiled is None:
        methods["fused"] = backward_of(fn, w, fused)
        methods["eager path"] = backward_of(fn, w, "0")
        if device.type == "cuda":
            methods["fused, replayed"] = replayed(fn, w, fused)
            methods["eager path, replayed"] = replayed(fn, w, "0")
        methods["products"] = products(kind, w, projections)
        methods["official"] = backward_of(official(kind, half_space, projections), w, "0")
    else:
        reference = "fused, replayed" if device.type == "cuda" else "fused"
        methods[reference] = replayed(fn, w, fused) if device.type == "cuda" else backward_of(fn, w, fused)
        methods["official, compiled"] = backward_of(
            functools.partial(compiled, **_compiled_kwargs(kind, projections)), w, "0"
        )
    timings = time_methods(methods, device, repeats)
    return {
        "kind": kind,
        "space": space,
        "n": n,
        "d": d,
        "wall": {k: t.wall for k, t in timings.items()},
        "walls": {k: t.walls for k, t in timings.items()},
    }


def _compiled_kwargs(kind: str, projections: torch.Tensor | None) -> dict:
    return {"projections": projections} if kind == "CoMHE" else {}


def _official_comhe(w: torch.Tensor, projections: torch.Tensor, half_space: bool) -> torch.Tensor:
    return official_comhe(w, projections, half_space)


def compiled_officials() -> dict[tuple[str, str], Callable[..., torch.Tensor]]:
    """One ``torch.compile`` per regulariser and space, reused across sizes (default settings: a
    second shape recompiles once with dynamic shapes, as it would for a user)."""
    out = {}
    for kind, space in KINDS:
        half_space = space == "half"
        fn: Callable[..., torch.Tensor] = official_uniformity
        if kind == "MHE":
            fn = functools.partial(official_mhe, half_space=half_space)
        elif kind == "MHS":
            fn = functools.partial(official_mhs, half_space=half_space)
        elif kind == "CoMHE":
            fn = functools.partial(_official_comhe, half_space=half_space)
        out[(kind, space)] = torch.compile(fn)
    return out


def layer_rows(results: list[dict], device: torch.device) -> tuple[list[str], list[list[object]]]:
    graphs = device.type == "cuda"
    header = ["regulariser", "space", "n", "d", "fused ms", "eager path ms"]
    header += ["fused replayed ms", "eager path replayed ms"] if graphs else []
    header += ["products ms", "official ms", "fused / products [95%]"]
    header += ["fused replayed / products [95%]", "official / fused replayed [95%]"] if graphs else []
    header += ["official / fused [95%]", "eager path / fused [95%]"]
    rows = []
    for r in results:
        wall = r["wall"]
        row: list[object] = [r["kind"], r["space"], r["n"], r["d"], ms(wall["fused"]), ms(wall["eager path"])]
        if graphs:
            row += [ms(wall["fused, replayed"]), ms(wall["eager path, replayed"])]
        row += [ms(wall["products"]), ms(wall["official"]), ratio(r, "fused", "products")]
        if graphs:
            row += [ratio(r, "fused, replayed", "products"), ratio(r, "official", "fused, replayed")]
        row += [ratio(r, "official", "fused"), ratio(r, "eager path", "fused")]
        rows.append(row)
    return header, rows


def cases(smoke: bool, max_n: int) -> list[tuple[str, str, int, int]]:
    sizes = [16, 40] if smoke else [n for n in (64, 256, 512, 1024, 2048, 4096) if n <= max_n]
    out = [("MHE", "half", 40, 72) if smoke else ("MHE", "half", 512, 4608)]
    for kind, space in KINDS:
        for n in sizes:
            d = 2 * n if smoke else dim_for(n)
            if (kind, space, n, d) not in out:
                out.append((kind, space, n, d))
    return out


def run_layers(device: torch.device, smoke: bool, max_n: int, repeats: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # the floor of the issue: float32 products without TF32
    print(f"### Per layer, forward + backward ({device.type}, TF32 off, medians of {repeats})\n")
    for index, (kind, space, n, d) in enumerate(cases(smoke, max_n)):
        header, rows = layer_rows([layer_case(kind, space, n, d, device, repeats)], device)
        lines = table(header, rows).splitlines()
        print("\n".join(lines if index == 0 else lines[2:]), flush=True)  # row by row: a timeout keeps them


def run_compiled(device: torch.device, smoke: bool, max_n: int, repeats: int) -> None:
    """The official formulations under ``torch.compile`` against the fused path, row by row."""
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = "fused, replayed" if device.type == "cuda" else "fused"
    print(f"\n### The official formulations under torch.compile, forward + backward ({device.type})\n")
    print(f"| regulariser | space | n | d | {reference} ms | official, compiled ms | compiled / {reference} [95%] |")
    print("|---|---|---|---|---|---|---|", flush=True)
    compiled = compiled_officials()
    for kind, space, n, d in cases(smoke, max_n):
        start = time.perf_counter()
        try:
            r = layer_case(kind, space, n, d, device, repeats, compiled=compiled[(kind, space)])
        except Exception as err:  # report, do not lose the other rows
            print(
                f"| {kind} | {space} | {n} | {d} | – | failed: {type(err).__name__}: {str(err)[:120]} | – |", flush=True
            )
            continue
        cells = [kind, space, n, d, f"{ms(r['wall'][reference]):.3g}", f"{ms(r['wall']['official, compiled']):.3g}"]
        cells.append(ratio(r, "official, compiled", reference))
        took = time.perf_counter() - start  # compilation included: the budget of the GPU session
        print("| " + " | ".join(str(c) for c in cells) + f" |  <!-- {took:.0f} s -->", flush=True)


# ---- the Lightning step ----------------------------------------------------------------------------
class _ProductsOnly(torch.autograd.Function):
    """Per layer the Gram product in forward and the gradient product in backward, nothing else
    (zero coefficients: the weights' gradients and the training are unchanged)."""

    @staticmethod
    def forward(ctx, coefficients: list[torch.Tensor], *weights: torch.Tensor) -> torch.Tensor:
        ctx.coefficients = coefficients
        ctx.save_for_backward(*weights)
        for w in weights:
            x = w.reshape(1, w.shape[0], -1)
            batched_matmul(x, x.transpose(1, 2))
        return weights[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights = ctx.saved_tensors
        grads = [
            batched_matmul(c, w.reshape(1, w.shape[0], -1)).view_as(w)
            for c, w in zip(ctx.coefficients, weights, strict=True)
        ]
        return (None, *grads)


def products_penalty(net: torch.nn.Module) -> Callable[[torch.nn.Module], torch.Tensor]:
    convs, fc = penalised_layers(net)
    layers = [*convs, fc]
    coefficients = [torch.zeros(1, m.weight.shape[0], m.weight.shape[0], device=m.weight.device) for m in layers]
    return lambda _net: _ProductsOnly.apply(coefficients, *[m.weight for m in layers])


#: The settings that take turns, one step each, within one fit.
STEP_MODES = ("off", "callback, eager path", "callback, fused kernel", "products only")


def step_rows(device: torch.device, batch_size: int, rounds: int) -> list[list[object]]:
    import lightning.pytorch as pl

    from lightning_hsu import HypersphericalUniformity

    callback = HypersphericalUniformity(preset="mhe")
    replays: dict[str, GraphReplay] = {}
    current = {"mode": "off"}
    extra: dict[str, Callable[[torch.nn.Module], torch.Tensor]] = {}

    def hand_written(net: torch.nn.Module) -> torch.Tensor | None:
        if current["mode"] != "products only":
            return None
        if "products" not in extra:
            extra["products"] = products_penalty(net)
        return extra["products"](net)

    times: dict[str, list[float]] = {mode: [] for mode in STEP_MODES}
    warm_up = 2  # rounds: the two captures happen in the first

    class Rotate(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            mode = current["mode"] = STEP_MODES[batch_idx % len(STEP_MODES)]
            callback.enabled = mode.startswith("callback")
            if callback.enabled:
                # each setting keeps its own captures; the setting counts when a graph is captured
                os.environ[TRITON_ENV] = "0" if mode.endswith("eager path") else fused_mode(device)
                engine = callback.engine
                replays.setdefault("default", engine.graphs)
                key = "default" if mode.endswith("eager path") else "fused"
                engine.graphs = replays.setdefault(key, GraphReplay(batch=replays["default"].batch))
            sync(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            if batch_idx >= warm_up * len(STEP_MODES):
                times[current["mode"]].append(time.perf_counter() - self.t0)

    previous = os.environ.get(TRITON_ENV)
    try:
        fit(device, (rounds + warm_up) * len(STEP_MODES), [Rotate(), callback], resnet_module(hand_written), batch_size)
    finally:
        os.environ.pop(TRITON_ENV, None) if previous is None else os.environ.__setitem__(TRITON_ENV, previous)
    rows = []
    base = times["off"]
    rows.append([f"batch {batch_size}: no penalty", ms(statistics.median(base)), "(baseline)", ""])
    for mode in STEP_MODES[1:]:
        rows.append([f"batch {batch_size}: {mode}", *growth(times[mode], base)])
    products_growth = statistics.median(times["products only"]) / statistics.median(base) - 1.0
    for mode in STEP_MODES[1:3]:
        callback_growth = statistics.median(times[mode]) / statistics.median(base) - 1.0
        share = callback_growth / products_growth if products_growth > 0 else math.nan
        rows.append([f"batch {batch_size}: {mode} growth / products growth (target <= 1.3)", f"{share:.2f}", "", ""])
    return rows


def run_step(device: torch.device, smoke: bool, rounds: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    batch_sizes = (4,) if smoke else (64, 256)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch_size in batch_sizes:
            rows += step_rows(device, batch_size, rounds)
    print(f"\n### CIFAR ResNet-18 Lightning step, preset 'mhe', settings rotating within one fit ({device.type})\n")
    print(table(["setting", "step ms", "vs no penalty", "paired, median [95% interval]"], rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument(
        "--part",
        choices=("layers", "step", "compile", "all"),
        default="all",
        help="the per-layer table, the rotating Lightning step, the official formulations compiled, or all three",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and repeats (a CPU check of the script)")
    parser.add_argument("--max-n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds of the rotating step")
    args = parser.parse_args()
    apply_threads(args.threads)
    device = device_arg(args.device)
    start = time.perf_counter()
    print(f"Machine: {machine()}\n")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("(CPU without TRITON_INTERPRET=1: the fused rows take the eager fallback)\n")
    repeats = args.repeats or (2 if args.smoke else 15)
    if args.part in ("layers", "all"):
        run_layers(device, args.smoke, args.max_n, repeats)
    if args.part in ("step", "all"):
        run_step(device, args.smoke, args.rounds or (1 if args.smoke else 25))
    if args.part in ("compile", "all"):
        run_compiled(device, args.smoke, args.max_n, repeats)
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
