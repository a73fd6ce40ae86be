"""Per-layer neuron-diversity report of saved checkpoints, one run or several side by side.

Usage:

```bash
python -m lightning_hsu.report model.ckpt [--compare other.ckpt ...] [--labels NAME ...]
    [--png angles.png] [--html report.html] [--json] [--layers PATTERN ...] [--exclude PATTERN ...]
    [--half-space] [--transpose PATTERN ...] [--bins N] [--max-neurons N|none] [--seed S]
```

prints a markdown table of `diversity_summary` for every layer (a row per layer and checkpoint).

- `--compare CKPT ...`: more checkpoints (a regularised run against a baseline, or the initial
  weights against the trained ones). Each metric column is then followed by a `Δ` column: the
  checkpoint's value minus the first checkpoint's.
- `--labels NAME ...`: one name per checkpoint, first then those of `--compare`, used in the table,
  the JSON and the figure's legend instead of the file names.
- `--json`: print the report as JSON instead of the table (per layer, per run: `shape`,
  `neurons_used`, `metrics`; per later run: `delta` against the first; `null` for a value that
  is not finite). Messages go to stderr, so stdout parses as it is.
- `--png OUT`: the figure of the pairwise-angle distributions, a panel per layer, zoomed to the
  angles the layer holds (`--bins` bins across that range, from 0.1° histograms), every run in
  its colour with a dashed line at its minimum angle, one legend for the figure.
- `--html OUT`: one self-contained page, the table and that figure embedded as a base64 PNG (no
  external file, script or stylesheet): a report to attach to an issue or mail.

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
import base64
import fnmatch
import html
import io
import json
import math
import sys
from collections.abc import Hashable, Mapping, Sequence
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
    from matplotlib.figure import Figure

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
    keys: dict[Hashable, int] = {}
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


#: Width in degrees of the bins of the report's angle histograms: the figure merges them into
#: `--bins` bins across the range each panel shows, so a layer whose angles lie within a few
#: degrees of 90° is drawn as sharply as one spread over 0–180°.
HISTOGRAM_RESOLUTION = 0.1


def metric_deltas(
    runs: Sequence[Mapping[str, float] | None],
) -> list[dict[str, float] | None]:
    """Each run's metrics minus the first run's (`None` for the first run, or where a run lacks the layer).

    Only metrics both runs have are differenced; the result of the first run is always `None`.
    """
    first = runs[0] if runs else None
    out: list[dict[str, float] | None] = [None]
    for metrics in runs[1:]:
        if first is None or metrics is None:
            out.append(None)
        else:
            out.append({k: metrics[k] - first[k] for k in metrics if k in first})
    return out


def _format_delta(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return f"{value:+.4g}"


def _table_cells(
    rows: Sequence[tuple[Sequence[str], Mapping[str, float] | None]],
    first: Sequence[str],
    deltas: Sequence[Mapping[str, float] | str | None] | None,
) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in _COLUMNS if any(m is not None and k in m for _, m in rows)]
    header = list(first)
    for k in keys:
        header.append(_COLUMNS[k])
        if deltas is not None:
            header.append("Δ " + _COLUMNS[k].removesuffix(" (°)"))
    body = []
    for i, (lead, metrics) in enumerate(rows):
        cells = list(lead)
        for k in keys:
            cells.append(_format(None if metrics is None else metrics.get(k)))
            if deltas is not None:
                delta = deltas[i]
                # "" marks the reference run's rows; a missing layer or metric is "—".
                if isinstance(delta, str):
                    cells.append(delta)
                else:
                    cells.append(_format_delta(None if delta is None else delta.get(k)))
        body.append(cells)
    return header, body


def markdown_table(
    rows: Sequence[tuple[Sequence[str], Mapping[str, float] | None]],
    first: Sequence[str],
    *,
    deltas: Sequence[Mapping[str, float] | str | None] | None = None,
) -> str:
    """A markdown table: leading columns `first` (strings per row), then one column per metric.

    With `deltas` (one entry per row: the row's metrics minus the reference run's, `""` for the
    reference run's own rows, `None` where there is no difference to show), each metric column is
    followed by its `Δ` column.
    """
    header, body = _table_cells(rows, first, deltas)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(cells) + " |" for cells in body)
    return "\n".join(lines)


def html_table(
    rows: Sequence[tuple[Sequence[str], Mapping[str, float] | None]],
    first: Sequence[str],
    *,
    deltas: Sequence[Mapping[str, float] | str | None] | None = None,
) -> str:
    """The table of `markdown_table` as an HTML `<table>` (cells escaped)."""
    header, body = _table_cells(rows, first, deltas)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = [f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>"]
    for cells in body:
        lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    lines.append("</tbody>\n</table>")
    return "\n".join(lines)


def _json_number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def report_json(
    layer_names: Sequence[str],
    labels: Sequence[str],
    paths: Sequence[str | Path],
    results: Sequence[Mapping[str, LayerResult]],
    *,
    half_space: bool,
    duplicate_threshold: float,
) -> dict[str, object]:
    """The report as JSON-ready data: per layer, per run (by label) the shape, the neurons used
    and the metrics, and each later run's `delta` against the first (`metric_deltas`).

    Values that are not finite (a `nan`, an infinite condition number) are `null`.
    """
    layers = []
    for name in layer_names:
        runs: dict[str, object] = {}
        metrics = [result[name].metrics if name in result else None for result in results]
        for label, result in zip(labels, results, strict=True):
            layer = result.get(name)
            runs[label] = None
            if layer is not None:
                runs[label] = {
                    "shape": list(layer.shape),
                    "neurons_used": layer.neurons_used,
                    "metrics": {k: _json_number(v) for k, v in layer.metrics.items()},
                }
        deltas = {
            label: None if delta is None else {k: _json_number(v) for k, v in delta.items()}
            for label, delta in zip(labels[1:], metric_deltas(metrics)[1:], strict=True)
        }
        layers.append({"name": name, "runs": runs, "delta": deltas})
    return {
        "space": "half" if half_space else "full",
        "duplicate_threshold": duplicate_threshold,
        "runs": [{"label": label, "checkpoint": str(path)} for label, path in zip(labels, paths, strict=True)],
        "reference": labels[0],
        "layers": layers,
    }


def angle_figure(
    layer_names: Sequence[str],
    labels: Sequence[str],
    results: Sequence[Mapping[str, LayerResult]],
    *,
    title: str | None = None,
    bins: int = 36,
) -> Figure:
    """The report's figure: a panel per layer, zoomed to its angles, one line and one dashed
    minimum-angle marker per run (labelled by `labels`; a single run unlabelled if its label is `""`)."""

    def panel_title(name: str) -> str:
        layer = next(result[name] for result in results if name in result)
        return f"{name} [{layer.neurons_used} of {layer.shape[0]} neurons]" if layer.sampled else name

    histograms: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    min_angles: dict[str, dict[str, float]] = {}
    for name in layer_names:
        key = panel_title(name)
        histograms[key] = {}
        min_angles[key] = {}
        for label, result in zip(labels, results, strict=True):
            if name in result:
                histograms[key][label] = (result[name].histogram, result[name].edges)
                if "min_angle" in result[name].metrics:
                    min_angles[key][label] = result[name].metrics["min_angle"]
    return plot_angle_distributions(histograms, title=title, min_angles=min_angles, bins=bins)


def html_page(title: str, notes: Sequence[str], table: str, png: bytes | None) -> str:
    """One self-contained HTML page: `title`, `notes` (paragraphs), the HTML `table` and the
    figure `png` embedded as a base64 `data:` URI; no external stylesheet, script or image."""
    figure = ""
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        figure = f'<figure><img alt="pairwise-angle distributions" src="data:image/png;base64,{data}"></figure>'
    paragraphs = "\n".join(f"<p>{html.escape(note)}</p>" for note in notes)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }}
th {{ background: #f3f3f3; }}
td:first-child, td:nth-child(2), th:first-child {{ text-align: left; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
figure {{ margin: 2em 0; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{paragraphs}
<div style="overflow-x: auto">
{table}
</div>
{figure}
</body>
</html>
"""


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
    parser.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        default=[],
        metavar="CKPT",
        help="more checkpoints, shown side by side; Δ columns are each one minus the first checkpoint",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        metavar="NAME",
        help="names of the checkpoints (first, then those of --compare) in the table, JSON and figure legend",
    )
    parser.add_argument("--png", type=Path, metavar="OUT", help="write the angle distributions to this PNG")
    parser.add_argument("--json", action="store_true", help="print JSON (per layer, per run: metrics and Δ)")
    parser.add_argument("--html", type=Path, metavar="OUT", help="write one self-contained HTML page: table and figure")
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
    parser.add_argument(
        "--bins", type=int, default=36, help="histogram bins across the range of angles each figure panel shows"
    )
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
    paths = [args.checkpoint, *args.compare]
    if args.labels is not None:
        if len(args.labels) != len(paths):
            parser.error(f"--labels needs one name per checkpoint ({len(paths)}), got {len(args.labels)}")
        if len(set(args.labels)) != len(args.labels):
            parser.error(f"--labels must be distinct, got {args.labels}")
        labels = list(args.labels)
    else:
        labels = [p.name for p in paths]
        if len(set(labels)) != len(labels):
            labels = [str(p) for p in paths]
        if len(set(labels)) != len(labels):
            labels = [f"{i + 1}: {p}" for i, p in enumerate(paths)]
    top = 90.0 if args.half_space else 180.0
    fine_bins = round(top / HISTOGRAM_RESOLUTION)
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
                    bins=fine_bins,
                    duplicate_threshold=args.duplicate_threshold,
                    max_neurons=args.max_neurons,
                    seed=args.seed,
                )
            )
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    layer_names = list(results[0]) + list(dict.fromkeys(n for r in results[1:] for n in r if n not in results[0]))
    space = "half-space (angles between lines)" if args.half_space else "full space"
    any_sampled = any(layer.sampled for result in results for layer in result.values())
    notes = [f"Neuron diversity, {space}; angles in degrees, duplicates under {args.duplicate_threshold:g}°."]
    if len(results) > 1:
        notes.append(f"Δ columns: each checkpoint's value minus that of {labels[0]}.")
    if any_sampled:
        notes.append(
            f"Layers with more than {args.max_neurons} neurons were profiled on {args.max_neurons} of them drawn at "
            f"random (seed {args.seed}; `--max-neurons none` for exact): mean∠, energy and the histogram are unbiased "
            "estimates, uniformity and the quantiles consistent ones; min∠ is only an upper bound, coherence and dup "
            "lower bounds, NN∠ an overestimate; erank and cond are exact (of the subset where d is above "
            f"{args.max_neurons} too)."
        )

    def used(layer: LayerResult | None) -> tuple[str, ...]:
        if not any_sampled:
            return ()
        if layer is None:
            return ("—",)
        return (f"{layer.neurons_used} of {layer.shape[0]}" if layer.sampled else "all",)

    rows: list[tuple[tuple[str, ...], dict[str, float] | None]] = []
    deltas: list[Mapping[str, float] | str | None] | None = None
    if len(results) == 1:
        rows = [
            ((name, "×".join(map(str, results[0][name].shape)), *used(results[0][name])), results[0][name].metrics)
            for name in layer_names
        ]
        first: tuple[str, ...] = ("layer", "n×d", *(("neurons used",) if any_sampled else ()))
    else:
        deltas = []
        for name in layer_names:
            layers = [result.get(name) for result in results]
            differences = metric_deltas([None if layer is None else layer.metrics for layer in layers])
            for i, (label, layer) in enumerate(zip(labels, layers, strict=True)):
                rows.append(((name, label, *used(layer)), layer.metrics if layer is not None else None))
                deltas.append("" if i == 0 else differences[i])
        first = ("layer", "checkpoint", *(("neurons used",) if any_sampled else ()))

    # With --json, stdout holds the JSON alone; messages go to stderr.
    message = sys.stderr if args.json else sys.stdout
    if args.json:
        data = report_json(
            layer_names,
            labels,
            paths,
            results,
            half_space=args.half_space,
            duplicate_threshold=args.duplicate_threshold,
        )
        print(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False))
    else:
        print(notes[0] + "\n")
        print(markdown_table(rows, first, deltas=deltas))
        for note in notes[1:]:
            print("\n" + note)

    if args.png is None and args.html is None:
        return 0
    # A single run without --labels needs no legend entry; otherwise the legend names the runs.
    figure_labels = labels if (len(results) > 1 or args.labels is not None) else [""]
    fig = angle_figure(layer_names, figure_labels, results, title=f"Pairwise angles, {space}", bins=args.bins)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    png = buffer.getvalue()
    outputs: list[tuple[Path, bytes]] = []
    if args.png is not None:
        outputs.append((args.png, png))
    if args.html is not None:
        title = "Neuron diversity: " + ", ".join(labels)
        page = html_page(title, notes, html_table(rows, first, deltas=deltas), png)
        outputs.append((args.html, page.encode("utf-8")))
    for path, content in outputs:
        try:
            path.write_bytes(content)
        except OSError as err:
            print(f"error: cannot write {path}: {err}", file=sys.stderr)
            return 2
        print(f"\nwrote {path}", file=message)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
