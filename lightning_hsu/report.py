"""Per-layer neuron-diversity report of a saved checkpoint, optionally against a second one.

Usage::

    python -m lightning_hsu.report model.ckpt [--png angles.png] [--layers PATTERN ...]
        [--exclude PATTERN ...] [--half-space] [--transpose PATTERN ...] [--compare other.ckpt]

prints a markdown table of :func:`~lightning_hsu.functional.diversity.diversity_summary` for every
layer and, with ``--png``, draws the pairwise-angle distribution of each layer (both checkpoints
overlaid with ``--compare``: the way to compare a regularised and an unregularised model).

No model class is needed: the layers are the floating-point ``*.weight`` tensors with 2+
dimensions of the checkpoint's ``state_dict`` (a Lightning checkpoint, or a bare state dict),
with neurons as rows, ``ConvNd`` weights ``[out, in/groups, *k]`` read as ``[out, rest]``.

**ConvTranspose weights** are stored ``[in, out/groups, *k]`` and cannot be told apart from a
convolution's by their shape alone: pass ``--transpose PATTERN`` (glob on layer names, e.g.
``'decoder.up*'``) to read the matching layers' output channels as neurons (``groups = 1``
assumed; grouped transposed convolutions are not recognisable from a state dict). Weights under a
``torch.nn.utils.parametrize`` parametrization (``*.parametrizations.weight.original``) are not
``*.weight`` keys and are skipped.
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

from lightning_hsu.functional.diversity import diversity_profile
from lightning_hsu.functional.neurons import transpose_conv_neurons

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Wrapper tokens that FSDP, activation checkpointing and torch.compile insert into parameter
#: names; a layer is reported under its name in the user's model.
WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

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
    """``name`` without the wrapper tokens of :data:`WRAPPER_TOKENS`."""
    for token in WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


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


def plot_angle_distributions(
    histograms: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]], *, title: str | None = None, columns: int = 4
) -> Figure:
    """A figure with one panel per layer: the density of its pairwise angles, one line per series.

    Args:
        histograms: ``{layer: {series label: (counts, edges in degrees)}}``.
        title: figure title.
        columns: panels per row.

    Uses :class:`matplotlib.figure.Figure` directly (no pyplot state), so it works headless.
    """
    from matplotlib.figure import Figure

    layers = list(histograms)
    cols = max(1, min(columns, len(layers)))
    rows = max(1, math.ceil(len(layers) / cols))
    fig = Figure(figsize=(4.0 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        for label, (counts, edges) in histograms[layer].items():
            counts_f = counts.double()
            widths = edges[1:].double() - edges[:-1].double()
            total = float(counts_f.sum())
            density = counts_f / (total * widths) if total > 0 else counts_f
            ax.stairs(density.numpy(), edges.double().numpy(), label=label or None)
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("pairwise angle (°)")
        ax.set_ylabel("density (1/°)")
        if any(histograms[layer]):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def figure_to_rgb(fig: Figure) -> object:
    """Render ``fig`` to an ``[H, W, 3]`` uint8 numpy array (for loggers that take images)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


@dataclass
class LayerResult:
    """One layer of a report: neuron matrix shape, scalar metrics and angle histogram."""

    shape: tuple[int, int]
    metrics: dict[str, float]
    histogram: Tensor
    edges: Tensor


def report_layers(
    neurons: Mapping[str, Tensor], *, half_space: bool = False, bins: int = 36, duplicate_threshold: float = 1.0
) -> dict[str, LayerResult]:
    """:func:`~lightning_hsu.functional.diversity.diversity_profile` of each layer's neurons."""
    out = {}
    for name, w in neurons.items():
        profile = diversity_profile(w, half_space=half_space, bins=bins, duplicate_threshold=duplicate_threshold)
        out[name] = LayerResult((int(w.shape[0]), int(w.shape[1])), profile.metrics, profile.histogram, profile.edges)
    return out


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
                    neurons, half_space=args.half_space, bins=args.bins, duplicate_threshold=args.duplicate_threshold
                )
            )
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    layer_names = list(results[0]) + [n for r in results[1:] for n in r if n not in results[0]]
    space = "half-space (angles between lines)" if args.half_space else "full space"
    print(f"Neuron diversity, {space}; angles in degrees, duplicates under {args.duplicate_threshold:g}°.\n")
    if len(results) == 1:
        rows = [((name, "×".join(map(str, results[0][name].shape))), results[0][name].metrics) for name in layer_names]
        print(markdown_table(rows, ("layer", "n×d")))
    else:
        rows = []
        for name in layer_names:
            for label, result in zip(labels, results, strict=True):
                rows.append(((name, label), result[name].metrics if name in result else None))
        print(markdown_table(rows, ("layer", "checkpoint")))

    if args.png is not None:
        histograms = {
            name: {
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
