"""Per-layer neuron-diversity report of a saved checkpoint, optionally against a second one.

Usage::

    python -m lightning_hsu.report model.ckpt [--png angles.png] [--layers PATTERN ...]
        [--exclude PATTERN ...] [--half-space] [--transpose PATTERN ...] [--compare other.ckpt]
        [--max-neurons N|none] [--seed S]

prints a markdown table of `diversity_summary` for every
layer and, with ``--png``, draws the pairwise-angle distribution of each layer (both checkpoints
overlaid with ``--compare``: the way to compare a regularised and an unregularised model).

No model class is needed: the layers are the floating-point ``*.weight`` tensors with 2+
dimensions of the checkpoint's ``state_dict`` (a Lightning checkpoint, or a bare state dict),
with neurons as rows, ``ConvNd`` weights ``[out, in/groups, *k]`` read as ``[out, rest]``.

**ConvTranspose weights** are stored ``[in, out/groups, *k]`` and cannot be told apart from a
convolution's by their shape alone: pass ``--transpose PATTERN`` (glob on layer names, e.g.
``'decoder.up*'``) to read the matching layers' output channels as neurons (``groups = 1``
assumed; grouped transposed convolutions are not recognisable from a state dict). The `Conv1D`
layers of `transformers`' GPT-2 (`c_attn`, `c_proj`, `c_fc`) also store `[in, out]`: pass
`--transpose '*.c_attn' '*.c_proj' '*.c_fc'` to read their output features as neurons. Weights under a
``torch.nn.utils.parametrize`` parametrization (``*.parametrizations.weight.original``) are not
``*.weight`` keys and are skipped.

**Huge layers** (more than `--max-neurons` neurons, 4,096 by default) are profiled on that many
neurons drawn at random (`--seed`), in about the time of a 4,096-neuron layer instead of minutes:
the table then gets a column `neurons used` (`4096 of 50257`) and a note on what the sampled
metrics mean (the mean angle, energy and histogram are unbiased estimates, the minimum angle only
an upper bound; see "Huge layers" in `lightning_hsu.functional.diversity`). `--max-neurons none`
computes every layer exactly.

**Tied weights** are profiled once. Two keys holding one tensor (in a checkpoint saved with
`torch.save`, tied parameters such as GPT-2's `transformer.wte.weight` and `lm_head.weight`
load as tensors sharing storage) or equal copies of it are one row, named
`transformer.wte (= lm_head)` (`merge_tied`).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_hsu.functional.diversity import DEFAULT_MAX_NEURONS, diversity_profile
from lightning_hsu.functional.neurons import transpose_conv_neurons
from lightning_hsu.layers import clean_module_name, storage_key
from lightning_hsu.plotting import plot_angle_distributions

if TYPE_CHECKING:
    pass

#: Wrapper tokens that FSDP, activation checkpointing and torch.compile insert into parameter
#: names; a layer is reported under its name in the user's model.

_COLUMNS = {
    "min_angle": "min∠ (°)",
    "mean_nn_angle": "NN∠ (°)",
    "mean_angle": "mean∠ (°)",
    "coherence": "coherence",
    "duplicates": "dup",
    "energy": "energy",
    "uniformity": "uniformity",
    "effective_rank": "erank",
    "condition_number": "cond",
    "angle_p5": "p5 (°)",
    "angle_p50": "p50 (°)",
    "angle_p95": "p95 (°)",
}


def clean_name(name: str) -> str:
    """A state-dict key without the wrapper segments of FSDP1, activation checkpointing and
    ``torch.compile`` (`lightning_hsu.layers.clean_module_name`)."""
    return clean_module_name(name)


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a Lightning checkpoint's ``state_dict`` (or of a bare state dict), on CPU."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not any(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: neither a Lightning checkpoint with a 'state_dict' nor a state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def layer_neurons(
    state_dict: Mapping[str, Tensor],
    *,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    transpose: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Neurons ``[n, d]`` of each layer of ``state_dict``, keyed by layer name (``key`` minus ``.weight``).

    Args:
        layers: glob patterns on layer names to keep (``None``: all); each must match a layer.
        exclude: glob patterns of layers to drop.
        transpose: glob patterns of ``ConvTranspose`` layers (see the module docstring).

    Raises:
        ValueError: a pattern of ``layers`` or ``transpose`` matches no layer.
    """
    candidates: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if not (key == "weight" or key.endswith(".weight")):
            continue
        if not tensor.is_floating_point() or tensor.dim() < 2:
            continue
        candidates[clean_name(key)[: -len("weight")].rstrip(".") or "weight"] = tensor
    names = list(candidates)
    for option, patterns in (("--layers", layers or ()), ("--transpose", transpose)):
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                raise ValueError(f"{option} pattern {pattern!r} matches no layer; layers are: {', '.join(names)}")
    out: dict[str, Tensor] = {}
    for name, weight in candidates.items():
        if layers is not None and not any(fnmatch.fnmatchcase(name, p) for p in layers):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in transpose):
            out[name] = transpose_conv_neurons(weight, groups=1)
        else:
            out[name] = weight.reshape(weight.shape[0], -1)
    return out


def merge_tied(neurons: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One entry per distinct neuron matrix: layers sharing one tensor are merged into one.

    Two layers are merged when their neuron matrices are views of the same memory (same storage,
    offset, shape and strides: how tied parameters load from a `torch.save`d state dict or
    Lightning checkpoint) or are equal copies (same shape and dtype, `torch.equal`: a tied
    parameter saved twice). The merged entry is named after the first layer, with the others in
    brackets: `transformer.wte (= lm_head)`; order is that of the first names.
    """
    groups: list[list[str]] = []
    keys: dict[tuple[object, ...], int] = {}
    by_shape: dict[tuple[object, ...], list[int]] = {}
    for name, tensor in neurons.items():
        key = storage_key(tensor)
        group = keys.get(key)
        if group is None:
            shape_key = (tuple(tensor.shape), tensor.dtype, str(tensor.device))
            for candidate in by_shape.get(shape_key, []):
                if torch.equal(neurons[groups[candidate][0]], tensor):
                    group = candidate
                    break
        if group is None:
            group = len(groups)
            groups.append([])
            by_shape.setdefault((tuple(tensor.shape), tensor.dtype, str(tensor.device)), []).append(group)
        keys[key] = group
        groups[group].append(name)
    out: dict[str, Tensor] = {}
    for names in groups:
        label = names[0] if len(names) == 1 else f"{names[0]} (= {', '.join(names[1:])})"
        out[label] = neurons[names[0]]
    return out


def _format(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def markdown_table(rows: Sequence[tuple[Sequence[str], Mapping[str, float] | None]], first: Sequence[str]) -> str:
    """A markdown table: leading columns ``first`` (strings per row), then one column per metric."""
    keys = [k for k in _COLUMNS if any(m is not None and k in m for _, m in rows)]
    header = [*first, *(_COLUMNS[k] for k in keys)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for lead, metrics in rows:
        cells = [*lead, *(_format(None if metrics is None else metrics.get(k)) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class LayerResult:
    """One layer of a report: neuron matrix shape, scalar metrics and angle histogram.

    `neurons_used` is below `shape[0]` when the layer was profiled on a random subset of its neurons.
    """

    shape: tuple[int, int]
    metrics: dict[str, float]
    histogram: Tensor
    edges: Tensor
    neurons_used: int

    @property
    def sampled(self) -> bool:
        """Whether the metrics come from a random subset of the neurons."""
        return self.neurons_used < self.shape[0]


def report_layers(
    neurons: Mapping[str, Tensor],
    *,
    half_space: bool = False,
    bins: int = 36,
    duplicate_threshold: float = 1.0,
    max_neurons: int | None = DEFAULT_MAX_NEURONS,
    seed: int = 0,
) -> dict[str, LayerResult]:
    """`diversity_profile` of each layer's neurons (`lightning_hsu.functional.diversity`).

    A layer of more than `max_neurons` neurons is profiled on that many, drawn at random with
    `seed` (`None`: every layer exactly). Tied layers should be merged first (`merge_tied`), or
    each is profiled.
    """
    out = {}
    for name, w in neurons.items():
        profile = diversity_profile(
            w,
            half_space=half_space,
            bins=bins,
            duplicate_threshold=duplicate_threshold,
            max_neurons=max_neurons,
            seed=seed,
        )
        out[name] = LayerResult(
            (int(w.shape[0]), int(w.shape[1])), profile.metrics, profile.histogram, profile.edges, profile.neurons_used
        )
    return out


def _max_neurons(text: str) -> int | None:
    if text.lower() in ("none", "all", "exact"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 or 'none', got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 or 'none', got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_hsu.report",
        description="Per-layer neuron-diversity metrics of a Lightning checkpoint (markdown table) "
        "and a PNG of the pairwise-angle distributions.",
    )
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file (or a saved state dict)")
    parser.add_argument("--compare", type=Path, metavar="CKPT", help="a second checkpoint, shown side by side")
    parser.add_argument("--png", type=Path, metavar="OUT", help="write the angle distributions to this PNG")
    parser.add_argument("--layers", nargs="+", metavar="PATTERN", help="glob patterns of layer names to report")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="glob patterns of layers to skip")
    parser.add_argument(
        "--transpose",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="layers that are ConvTranspose (weights [in, out, *k]; not recognisable from a state dict)",
    )
    parser.add_argument("--half-space", action="store_true", help="angles between lines: min(θ, 180°−θ)")
    parser.add_argument("--bins", type=int, default=36, help="histogram bins over [0, 180] ([0, 90] half-space)")
    parser.add_argument(
        "--duplicate-threshold",
        type=float,
        default=1.0,
        help="nearest-neighbour angle (°) under which a neuron is a duplicate",
    )
    parser.add_argument(
        "--max-neurons",
        type=_max_neurons,
        default=DEFAULT_MAX_NEURONS,
        metavar="N",
        help=f"profile layers with more neurons on N of them drawn at random (default {DEFAULT_MAX_NEURONS}; "
        "'none': every layer exactly, O(n²) time)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of those random subsets (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report; returns the exit status (0 on success, 2 on a usage or input error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.bins < 1:
        parser.error(f"--bins must be >= 1, got {args.bins}")
    paths = [args.checkpoint] + ([args.compare] if args.compare is not None else [])
    labels = [p.name for p in paths]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [str(p) for p in paths]
    results = []
    try:
        for path in paths:
            neurons = layer_neurons(
                load_state_dict(path), layers=args.layers, exclude=args.exclude, transpose=args.transpose
            )
            if not neurons:
                raise ValueError(f"{path}: no layer with a 2+-D floating-point '*.weight' tensor left to report")
            results.append(
                report_layers(
                    merge_tied(neurons),
                    half_space=args.half_space,
                    bins=args.bins,
                    duplicate_threshold=args.duplicate_threshold,
                    max_neurons=args.max_neurons,
                    seed=args.seed,
                )
            )
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    layer_names = list(results[0]) + [n for r in results[1:] for n in r if n not in results[0]]
    space = "half-space (angles between lines)" if args.half_space else "full space"
    print(f"Neuron diversity, {space}; angles in degrees, duplicates under {args.duplicate_threshold:g}°.\n")
    any_sampled = any(layer.sampled for result in results for layer in result.values())

    def used(layer: LayerResult | None) -> tuple[str, ...]:
        if not any_sampled:
            return ()
        if layer is None:
            return ("—",)
        return (f"{layer.neurons_used} of {layer.shape[0]}" if layer.sampled else "all",)

    if len(results) == 1:
        rows: list[tuple[tuple[str, ...], dict[str, float] | None]] = [
            ((name, "×".join(map(str, results[0][name].shape)), *used(results[0][name])), results[0][name].metrics)
            for name in layer_names
        ]
        print(markdown_table(rows, ("layer", "n×d", *(("neurons used",) if any_sampled else ()))))
    else:
        rows = []
        for name in layer_names:
            for label, result in zip(labels, results, strict=True):
                layer = result.get(name)
                rows.append(((name, label, *used(layer)), layer.metrics if layer is not None else None))
        print(markdown_table(rows, ("layer", "checkpoint", *(("neurons used",) if any_sampled else ()))))
    if any_sampled:
        print(
            f"\nLayers with more than {args.max_neurons} neurons were profiled on {args.max_neurons} of them drawn at "
            f"random (seed {args.seed}; `--max-neurons none` for exact): mean∠, energy and the histogram are unbiased "
            "estimates, uniformity and the quantiles consistent ones; min∠ is only an upper bound, coherence and dup "
            "lower bounds, NN∠ an overestimate; erank and cond are exact (of the subset where d is above "
            f"{args.max_neurons} too)."
        )

    if args.png is not None:

        def panel_title(name: str) -> str:
            layer = next(result[name] for result in results if name in result)
            return f"{name} [{layer.neurons_used} of {layer.shape[0]} neurons]" if layer.sampled else name

        histograms = {
            panel_title(name): {
                (label if len(results) > 1 else ""): (result[name].histogram, result[name].edges)
                for label, result in zip(labels, results, strict=True)
                if name in result
            }
            for name in layer_names
        }
        fig = plot_angle_distributions(histograms, title=f"Pairwise angles, {space}")
        try:
            fig.savefig(args.png, format="png", dpi=100)
        except OSError as err:
            print(f"error: cannot write {args.png}: {err}", file=sys.stderr)
            return 2
        print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
