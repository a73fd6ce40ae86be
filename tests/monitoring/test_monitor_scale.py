"""NeuronDiversityMonitor on huge layers, tied weights and many layers (one logging event each,
driven directly: a Trainer adds nothing to what these check and costs seconds)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from metrics.geometry import dense_angles
from torch import nn

import lightning_hsu.callbacks.monitor as monitor_module
from lightning_hsu.callbacks import NeuronDiversityMonitor
from lightning_hsu.functional.diversity import sample_neuron_indices


class Experiment:
    """What a TensorBoard `SummaryWriter` offers the monitor, recorded."""

    def __init__(self) -> None:
        self.figures: list[Any] = []
        self.histograms: dict[str, dict[str, Any]] = {}

    def add_figure(self, tag: str, figure: Any, global_step: int, close: bool) -> None:
        self.figures.append(figure)

    def add_histogram_raw(self, tag: str, **kwargs: Any) -> None:
        self.histograms[tag] = kwargs


class RecordingLogger:
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.experiment = Experiment()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.update(metrics)


def single_process_trainer(model: nn.Module, logger: RecordingLogger) -> SimpleNamespace:
    """What the monitor reads of a one-process Trainer."""
    return SimpleNamespace(
        global_step=1,
        current_epoch=0,
        is_global_zero=True,
        loggers=[logger],
        strategy=SimpleNamespace(model=model, broadcast=lambda obj, src=0: obj),
    )


def log_once(monitor: NeuronDiversityMonitor, model: nn.Module) -> RecordingLogger:
    logger = RecordingLogger()
    monitor._selected = monitor._resolve(model)
    monitor._profile_and_write(single_process_trainer(model, logger), model, step=1)  # type: ignore[arg-type]
    return logger


class WideNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.small = nn.Linear(6, 10)
        self.big = nn.Linear(6, 300)


def test_huge_layer_is_profiled_on_a_subset_and_says_so() -> None:
    model = WideNet()
    logged = log_once(NeuronDiversityMonitor(max_neurons=50, sample_seed=2), model).metrics
    assert logged["hsu/diversity/big/neurons_used"] == 50
    assert "hsu/diversity/small/neurons_used" not in logged  # 10 <= 50 neurons: exact, nothing to say
    drawn = dense_angles(model.big.weight.detach()[sample_neuron_indices(300, 50, seed=2)])
    assert logged["hsu/diversity/big/mean_angle"] == pytest.approx(float(drawn.mean()), abs=1e-3)
    assert logged["hsu/diversity/big/min_angle"] == pytest.approx(float(drawn.min()), abs=1e-3)
    exact = dense_angles(model.small.weight.detach())
    assert logged["hsu/diversity/small/min_angle"] == pytest.approx(float(exact.min()), abs=1e-3)

    everything = log_once(NeuronDiversityMonitor(max_neurons=None), model).metrics
    assert not any(key.endswith("neurons_used") for key in everything)
    all_angles = dense_angles(model.big.weight.detach())
    assert everything["hsu/diversity/big/min_angle"] == pytest.approx(float(all_angles.min()), abs=1e-3)


class TiedNet(nn.Module):
    """An output layer sharing the input embedding's weight, as GPT-2's lm_head and wte."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 40, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weight_is_profiled_once_under_both_names(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    profiled: list[int] = []
    real = monitor_module.diversity_profile

    def counting(neurons: torch.Tensor, **kwargs: Any) -> Any:
        profiled.append(neurons.shape[0])
        return real(neurons, **kwargs)

    monkeypatch.setattr(monitor_module, "diversity_profile", counting)
    monitor = NeuronDiversityMonitor(layer_types=("Linear", "Embedding"), figure_style="panels")
    with caplog.at_level(logging.INFO):
        logger = log_once(monitor, TiedNet())
    assert sorted(profiled) == [8, 40]  # hidden, and the tied 40 x 8 matrix once
    assert "hsu/diversity/embed/min_angle" in logger.metrics and not any(
        k.startswith("hsu/diversity/head/") for k in logger.metrics
    )
    assert "'embed', 'head' share one weight" in caplog.text
    (figure,) = logger.experiment.figures
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles == ["embed (= head)", "hidden"]


def test_many_layers_are_drawn_as_one_heatmap_from_the_logged_histograms() -> None:
    model = nn.Sequential(*[nn.Linear(5, 7) for _ in range(13)])
    logger = log_once(NeuronDiversityMonitor(histogram_bins=9), model)
    (figure,) = logger.experiment.figures
    heatmap = figure.axes[0]  # then the colour bar
    assert [t.get_text() for t in heatmap.get_yticklabels()] == [str(i) for i in range(13)]
    # Row 4's colours are the density of the histogram sent to TensorBoard for layer 4.
    sent = logger.experiment.histograms["hsu/diversity/4/angles"]
    counts = torch.tensor(sent["bucket_counts"], dtype=torch.float64)
    density = counts / (counts.sum() * 20.0)  # 9 bins of 20 degrees
    mesh = heatmap.collections[4]
    assert mesh.get_array().ravel().tolist() == pytest.approx(density.tolist())

    panels = log_once(NeuronDiversityMonitor(histogram_bins=9, figure_style="panels"), model)
    assert sum(ax.get_visible() for ax in panels.experiment.figures[0].axes) == 13


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_neurons", 1), ("max_neurons", True), ("sample_seed", 1.5), ("figure_style", "grid")],
)
def test_scale_options_are_validated(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        NeuronDiversityMonitor(**{option: value})  # type: ignore[arg-type]


def test_the_figure_shows_each_layers_first_profile_beside_the_current_one() -> None:
    """Is it working? The panel of a layer shows the angles when first logged and now, each with its
    minimum marked, so a change since initialisation reads off the figure."""
    model = WideNet()
    monitor = NeuronDiversityMonitor(figure_style="panels", metrics=["min_angle"])
    logger = RecordingLogger()
    trainer = single_process_trainer(model, logger)
    monitor._selected = monitor._resolve(model)
    monitor._profile_and_write(trainer, model, step=0)  # type: ignore[arg-type]
    with torch.no_grad():
        model.small.weight.copy_(torch.eye(10, 6))  # now rows 6-9 are zero: the angles change
    monitor._profile_and_write(trainer, model, step=5)  # type: ignore[arg-type]
    first, second = logger.experiment.figures
    assert [t.get_text() for t in first.legends[0].get_texts()] == ["step 0", "minimum angle"]
    labels = [t.get_text() for t in second.legends[0].get_texts()]
    assert labels == ["step 0 (first logged)", "step 5", "minimum angle"]
    panel = next(ax for ax in second.axes if ax.get_title().startswith("small"))
    marks = sorted(float(line.get_xdata()[0]) for line in panel.lines if line.get_linestyle() == "--")
    exact_then = float(dense_angles(WideNet().small.weight.detach()).min())
    # then: the random rows' minimum; now: orthogonal unit rows and zero rows (orthogonal to all), 90°
    assert marks == pytest.approx(sorted([exact_then, 90.0]), abs=1e-2)
