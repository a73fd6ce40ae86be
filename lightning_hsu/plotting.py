"""Figures of the pairwise angles of layers' neurons, shared by the monitor and the report.

matplotlib is imported inside each function (it is an optional dependency), and figures are
built with `matplotlib.figure.Figure` directly (no pyplot state), so they work headless.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _occupied_range(series: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[float, float] | None:
    """The smallest interval of bin edges holding every counted angle of all `series`."""
    lo, hi = math.inf, -math.inf
    for counts, edges in series.values():
        nonzero = (counts > 0).nonzero().flatten()
        if nonzero.numel():
            lo = min(lo, float(edges[int(nonzero[0])]))
            hi = max(hi, float(edges[int(nonzero[-1]) + 1]))
    return (lo, hi) if lo < hi else None


def _view(span: tuple[float, float] | None, full: tuple[float, float]) -> tuple[float, float]:
    """The x-limits of a panel: the occupied `span` padded by 8 % of its width (at least 0.5°),
    clipped to the `full` range of the edges."""
    if span is None:
        return full
    pad = max(0.08 * (span[1] - span[0]), 0.5)
    return max(full[0], span[0] - pad), min(full[1], span[1] + pad)


def _rebin(counts: Tensor, edges: Tensor, view: tuple[float, float], bins: int) -> tuple[Tensor, Tensor]:
    """Merge runs of consecutive bins so that about `bins` of them cover `view`; counts are exact
    sums of the original bins (nothing is interpolated), edges a subset of the original edges."""
    inside = int(((edges[1:] > view[0]) & (edges[:-1] < view[1])).sum())
    step = max(1, inside // max(1, bins))
    if step == 1:
        return counts, edges
    first = int((edges[1:] <= view[0]).sum())  # first bin reaching into the view
    starts = list(range(first % step, counts.numel(), step))
    if starts[0] != 0:
        starts.insert(0, 0)
    index = torch.tensor([*starts, counts.numel()])
    cumulative = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return cumulative[index[1:]] - cumulative[index[:-1]], edges[index]


def _density(counts: Tensor, edges: Tensor) -> Tensor:
    counts_f = counts.double()
    widths = edges[1:].double() - edges[:-1].double()
    total = float(counts_f.sum())
    return counts_f / (total * widths) if total > 0 else counts_f


def _short(name: str, limit: int = 42) -> str:
    """`name` cut from the left to `limit` characters: the end of a module path names the layer."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


#: The `gid` of the vertical line marking a series' minimum angle in `plot_angle_distributions`.
MIN_ANGLE_GID = "min-angle"


def plot_angle_distributions(
    histograms: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]],
    *,
    title: str | None = None,
    columns: int = 4,
    min_angles: Mapping[str, Mapping[str, float]] | None = None,
    bins: int | None = None,
    zoom: bool = True,
) -> Figure:
    """A figure with one panel per layer: the density of its pairwise angles, one line per series.

    Args:
        histograms: `{layer: {series label: (counts, edges in degrees)}}`; a series labelled `""`
            gets no legend entry. The series of all panels share one figure-level legend and one
            colour per label (e.g. initial vs current weights, or one run against another).
        title: figure title.
        columns: panels per row (fewer when there are fewer layers).
        min_angles: `{layer: {series label: minimum angle in degrees}}`: a dashed vertical line
            in the series' colour at each (its `gid` is `MIN_ANGLE_GID`).
        bins: about this many bins across each panel's visible range, by merging consecutive bins
            of the histograms (pass fine histograms, e.g. 0.1° bins, for a sharp zoomed panel);
            `None`: the bins as given.
        zoom: set each panel's x-limits to the angles it holds (the occupied bins of all its
            series and its minimum angles, padded by 8 %) instead of the whole edge range: in a
            high-dimensional layer the angles sit in a few degrees around 90°.

    Uses `matplotlib.figure.Figure` directly (no pyplot state), so it works headless.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    layers = list(histograms)
    cols = max(1, min(columns, len(layers)))
    rows = max(1, math.ceil(len(layers) / cols))
    labels = list(dict.fromkeys(label for series in histograms.values() for label in series))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig = Figure(figsize=(max(4.2 * cols, 6.0), 2.9 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    for index, (ax, layer) in enumerate(zip(axes.flat, layers, strict=False)):
        series = histograms[layer]
        marks = (min_angles or {}).get(layer, {})
        edges_all = [e for _, e in series.values()]
        full = (
            (min(float(e[0]) for e in edges_all), max(float(e[-1]) for e in edges_all)) if edges_all else (0.0, 180.0)
        )
        span = _occupied_range(series)
        finite_marks = [v for v in marks.values() if math.isfinite(v)]
        if span is not None and finite_marks:
            span = (min(span[0], *finite_marks), max(span[1], *finite_marks))
        view = _view(span, full) if zoom else full
        for label, (counts, edges) in series.items():
            if bins is not None:
                counts, edges = _rebin(counts, edges, view, bins)
            ax.stairs(
                _density(counts, edges).numpy(), edges.double().numpy(), color=colours[label], label=label or None
            )
        for label, angle in marks.items():
            if math.isfinite(angle):
                ax.axvline(angle, color=colours.get(label, "k"), linestyle="--", linewidth=1.0, gid=MIN_ANGLE_GID)
        ax.set_xlim(*view)
        ax.set_title(_short(layer), fontsize=9)
        ax.tick_params(labelsize=7)
        if index % cols == 0:
            ax.set_ylabel("density (1/°)", fontsize=8)
        if index + cols >= len(layers):  # the lowest panel of its column
            ax.set_xlabel("pairwise angle (°)", fontsize=8)
    handles = [Line2D([], [], color=colours[label], label=label) for label in labels if label]
    if min_angles:
        handles.append(Line2D([], [], color="0.3", linestyle="--", linewidth=1.0, label="minimum angle"))
    if handles:
        # The title heads the legend: a suptitle and an "outside" legend would overlap.
        legend = fig.legend(
            handles=handles,
            loc="outside upper center",
            ncols=min(len(handles), 4),
            fontsize=9,
            frameon=False,
            title=title,
            title_fontsize=12,
        )
        legend.set_gid("legend")
    elif title:
        fig.suptitle(title)
    return fig


def plot_angle_heatmap(
    histograms: Mapping[str, tuple[Tensor, Tensor]],
    *,
    title: str | None = None,
    min_angles: Mapping[str, float] | None = None,
    zoom: bool = True,
) -> Figure:
    """One panel for many layers: a row per layer, the density of its pairwise angles in colour.

    Args:
        histograms: `{layer: (counts, edges in degrees)}`; a layer without pairs is a blank row.
        title: figure title.
        min_angles: `{layer: minimum angle in degrees}`: a white tick on the layer's row at each
            (its `gid` is `MIN_ANGLE_GID`).
        zoom: set the x-limits to the angles of all layers (their occupied bins and minimum
            angles, padded by 8 %) instead of the whole edge range.

    One panel for all layers draws in about a tenth of the time of `plot_angle_distributions`'
    panel per layer at 50 layers (docs/performance.md). Uses
    `matplotlib.figure.Figure` directly (no pyplot state), so it works headless.
    """
    import numpy as np
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    layers = list(histograms)
    densities = []
    for layer in layers:
        counts, edges = histograms[layer]
        counts_f = counts.double()
        widths = edges[1:].double() - edges[:-1].double()
        total = float(counts_f.sum())
        densities.append((counts_f / (total * widths)).numpy() if total > 0 else np.full(len(counts_f), np.nan))
    finite = [float(np.nanmax(d)) for d in densities if np.isfinite(d).any()]
    norm = Normalize(vmin=0.0, vmax=max(finite) if finite else 1.0)
    fig = Figure(figsize=(9.0, 1.2 + 0.22 * max(1, len(layers))), layout="constrained")
    ax = fig.subplots()
    mesh = None
    for row, layer in enumerate(layers):
        bounds = histograms[layer][1].double().numpy()
        mesh = ax.pcolormesh(bounds, [row, row + 1], densities[row][None, :], norm=norm, cmap="viridis")
    marks = {layer: v for layer, v in (min_angles or {}).items() if layer in histograms and math.isfinite(v)}
    if marks:
        rows = [layers.index(layer) + 0.5 for layer in marks]
        ax.plot(
            list(marks.values()), rows, linestyle="none", marker="|", markersize=9, color="white", gid=MIN_ANGLE_GID
        )
    if zoom and layers:
        edges_all = [histograms[layer][1] for layer in layers]
        full = (min(float(e[0]) for e in edges_all), max(float(e[-1]) for e in edges_all))
        span = _occupied_range(histograms)
        if span is not None and marks:
            span = (min(span[0], *marks.values()), max(span[1], *marks.values()))
        ax.set_xlim(*_view(span, full))
    ax.set_ylim(len(layers), 0)
    ax.set_yticks(np.arange(len(layers)) + 0.5, layers, fontsize=7)
    ax.set_xlabel("pairwise angle (°)")
    if mesh is not None:
        fig.colorbar(mesh, ax=ax, label="density (1/°)", pad=0.01)
    if title:
        ax.set_title(title)
    return fig


def figure_to_rgb(fig: Figure) -> object:
    """Render ``fig`` to an ``[H, W, 3]`` uint8 numpy array (for loggers that take images)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
