"""Figures of the pairwise angles of layers' neurons, shared by the monitor and the report.

matplotlib is imported inside each function (it is an optional dependency), and figures are
built with `matplotlib.figure.Figure` directly (no pyplot state), so they work headless.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_angle_distributions(
    histograms: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]], *, title: str | None = None, columns: int = 4
) -> Figure:
    """A figure with one panel per layer: the density of its pairwise angles, one line per series.

    Args:
        histograms: ``{layer: {series label: (counts, edges in degrees)}}``.
        title: figure title.
        columns: panels per row.

    Uses `matplotlib.figure.Figure` directly (no pyplot state), so it works headless.
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


def plot_angle_heatmap(histograms: Mapping[str, tuple[Tensor, Tensor]], *, title: str | None = None) -> Figure:
    """One panel for many layers: a row per layer, the density of its pairwise angles in colour.

    Args:
        histograms: `{layer: (counts, edges in degrees)}`; a layer without pairs is a blank row.
        title: figure title.

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
