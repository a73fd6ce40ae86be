"""The angle figures read back: size, zoomed x-limits, one legend with the run labels, min-angle markers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from metrics.geometry import dense_angles

from lightning_hsu.plotting import MIN_ANGLE_GID, plot_angle_distributions, plot_angle_heatmap

EDGES = torch.linspace(0.0, 180.0, 1801)  # 0.1° bins, as the report computes them


def angles_of(n: int, d: int, seed: int) -> torch.Tensor:
    return dense_angles(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


def histogram(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts, _ = np.histogram(angles.numpy(), bins=EDGES.numpy())
    return torch.from_numpy(counts), EDGES


Layers = dict[str, dict[str, torch.Tensor]]


def layers(count: int) -> Layers:
    """The pairwise angles of `count` layers (alternating 4-D and 256-D neurons) in two runs."""
    out = {}
    for i in range(count):
        d = 4 if i % 2 == 0 else 256
        out[f"encoder.layers.{i}.mlp"] = {
            "run A": angles_of(24, d, seed=2 * i),
            "run B": angles_of(24, d, seed=2 * i + 1),
        }
    return out


def png_size(fig: object) -> tuple[int, int]:
    """(height, width) in pixels of `fig` saved as PNG at 100 dpi, read back with matplotlib."""
    import matplotlib.image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)  # type: ignore[attr-defined]
    buffer.seek(0)
    image = matplotlib.image.imread(buffer, format="png")
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image.shape[0], image.shape[1]


@pytest.mark.parametrize("count", [1, 26])
def test_figure_for_1_and_26_layers_reads_back(count: int) -> None:
    angles = layers(count)
    histograms = {name: {run: histogram(a) for run, a in runs.items()} for name, runs in angles.items()}
    minima = {name: {run: float(a.min()) for run, a in runs.items()} for name, runs in angles.items()}
    fig = plot_angle_distributions(histograms, title="Pairwise angles", min_angles=minima, bins=36)
    height, width = png_size(fig)
    inches = fig.get_size_inches()
    assert (height, width) == (round(inches[1] * 100), round(inches[0] * 100))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == count
    rows = int(np.ceil(count / min(4, count)))
    assert height / rows >= 250  # every row of panels keeps at least 250 px at 100 dpi

    # One legend for the figure, naming the runs, and none inside the panels.
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run A", "run B", "minimum angle"]
    assert all(ax.get_legend() is None for ax in panels)

    for ax in panels:
        name = ax.get_title()
        all_angles = torch.cat(list(angles[name].values()))
        lo, hi = ax.get_xlim()
        # The x-axis follows the data: every angle is inside, and the view is at most a few
        # degrees (plus 8 %) wider than the angles' range, not the whole 0–180°.
        assert lo <= float(all_angles.min()) and float(all_angles.max()) <= hi
        spread = float(all_angles.max() - all_angles.min())
        assert hi - lo <= 1.2 * spread + 2.0
        markers = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() == MIN_ANGLE_GID)
        assert markers == pytest.approx(sorted(minima[name].values()))


def test_high_dimensional_layer_is_zoomed_and_finely_binned() -> None:
    angles = angles_of(40, 512, seed=0)  # all within a few degrees of 90°
    fig = plot_angle_distributions({"wide": {"": histogram(angles)}}, bins=30)
    (ax,) = fig.axes
    lo, hi = ax.get_xlim()
    assert 80 < lo < float(angles.min()) and float(angles.max()) < hi < 100
    (steps,) = ax.patches  # the stairs of the one series
    edges = steps.get_data().edges
    visible = edges[(edges > lo) & (edges < hi)]
    assert 25 <= len(visible) <= 35  # about `bins` bins across the view, not 5° bins
    # Merging bins keeps the counts: the density integrates to 1.
    assert float(np.sum(steps.get_data().values * np.diff(edges))) == pytest.approx(1.0)


def test_monitor_call_signatures_still_work() -> None:
    counts, edges = torch.tensor([0, 3, 5, 0]), torch.linspace(0.0, 180.0, 5)
    fig = plot_angle_distributions({"fc": {"": (counts, edges)}}, title="step 3")
    assert fig.legends == [] and fig.axes[0].get_xlim() == pytest.approx((37.8, 142.2))  # bins 45–135, ±7.2°
    heat = plot_angle_heatmap({"fc": (counts, edges)}, title="step 3")
    assert png_size(heat)[0] > 50


def test_heatmap_zooms_to_all_layers_angles_and_marks_minima() -> None:
    angles = {"a": angles_of(30, 256, seed=0), "b": angles_of(30, 512, seed=1)}
    minima = {name: float(a.min()) for name, a in angles.items()}
    fig = plot_angle_heatmap({name: histogram(a) for name, a in angles.items()}, min_angles=minima)
    ax = fig.axes[0]
    everything = torch.cat(list(angles.values()))
    lo, hi = ax.get_xlim()
    assert lo <= float(everything.min()) and float(everything.max()) <= hi
    assert hi - lo <= 1.2 * float(everything.max() - everything.min()) + 2.0  # not 0–180°
    (marks,) = [line for line in ax.get_lines() if line.get_gid() == MIN_ANGLE_GID]
    assert list(marks.get_xdata()) == pytest.approx([minima["a"], minima["b"]])
    assert list(marks.get_ydata()) == [0.5, 1.5]  # on rows a and b
