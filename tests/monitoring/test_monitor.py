"""NeuronDiversityMonitor: keys through a CSV logger, histograms and figures through TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_hsu.callbacks import NeuronDiversityMonitor
from lightning_hsu.functional import neurons_of
from lightning_hsu.functional.diversity import DIVERSITY_METRICS, diversity_summary

from .conftest import Run, TinyNet, quiet_trainer, tiny_loader

LAYERS = ("fc1", "conv", "head")
QUANTILE_KEYS = ("angle_p5", "angle_p50", "angle_p95")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_gets_every_metric_and_quantiles(trained_run: Run) -> None:
    rows = [r for r in read_csv(trained_run.csv_dir / "metrics.csv") if r.get("hsu/fc1/min_angle")]
    # every_n_steps=3 → step 3; epoch end → step 4 (global_step after the 4th optimizer step).
    assert [int(r["step"]) for r in rows] == [3, 4]
    expected = {f"hsu/{layer}/{m}" for layer in LAYERS for m in (*DIVERSITY_METRICS, *QUANTILE_KEYS)}
    present = {k for k in rows[0] if k.startswith("hsu/")}
    assert present == expected  # no LayerNorm: 1-D weight; no histograms in a CSV
    # The last row is the final weights' summary.
    for layer in LAYERS:
        module = getattr(trained_run.model, layer)
        summary = diversity_summary(neurons_of(module, name=layer))
        for metric, value in summary.items():
            assert float(rows[-1][f"hsu/{layer}/{metric}"]) == pytest.approx(value, rel=1e-4, abs=1e-4), metric
    # The user's own metric is untouched by the monitor.
    assert any(r.get("train_loss") for r in read_csv(trained_run.csv_dir / "metrics.csv"))


def test_tensorboard_gets_histograms_figure_and_scalars(trained_run: Run) -> None:
    acc = EventAccumulator(str(trained_run.tb_dir), size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for layer in LAYERS:
        assert f"hsu/{layer}/angles" in tags["histograms"]
        assert f"hsu/{layer}/min_angle" in tags["scalars"]
        assert f"hsu/{layer}/angle_p50" not in tags["scalars"]  # TensorBoard has the histogram instead
    assert "hsu/angle_distributions" in tags["images"]
    events = acc.Histograms("hsu/conv/angles")
    assert [e.step for e in events] == [3, 4]
    hist = events[-1].histogram_value
    n = trained_run.model.conv.out_channels
    assert hist.num == n * (n - 1) // 2
    assert sum(hist.bucket) == hist.num
    assert len(hist.bucket) == 12 and hist.bucket_limit[-1] == pytest.approx(180.0)
    scalar = acc.Scalars("hsu/head/min_angle")[-1].value
    expected = diversity_summary(neurons_of(trained_run.model.head))["min_angle"]
    assert scalar == pytest.approx(expected, rel=1e-4)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        NeuronDiversityMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="never log"):
        NeuronDiversityMonitor(every_n_steps=None, log_at_epoch_end=False)
    with pytest.raises(ValueError, match="min_angel"):
        NeuronDiversityMonitor(metrics=["min_angel"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="histogram_bins"):
        NeuronDiversityMonitor(histogram_bins=0)


def test_pattern_matching_no_layer_fails_in_setup(tmp_path: Path) -> None:
    monitor = NeuronDiversityMonitor(layers=["fc*", "decoder.*"])
    trainer = quiet_trainer(tmp_path, max_steps=1, logger=CSVLogger(tmp_path), callbacks=[monitor])
    with pytest.raises(ValueError, match=r"`layers` pattern 'decoder\.\*' matches no layer"):
        trainer.fit(TinyNet(), tiny_loader())


def test_layer_selection() -> None:
    model = TinyNet()
    assert [n for n, _ in NeuronDiversityMonitor()._resolve(model)] == ["fc1", "conv", "head"]
    assert [n for n, _ in NeuronDiversityMonitor(layers=["*c*"], exclude=["conv"])._resolve(model)] == ["fc1"]
    assert [n for n, _ in NeuronDiversityMonitor(layer_types=[nn.Conv1d])._resolve(model)] == ["conv"]
    assert [n for n, _ in NeuronDiversityMonitor(layer_types=["Conv*"])._resolve(model)] == ["conv"]
    with pytest.raises(ValueError, match="`exclude` pattern 'nope'"):
        NeuronDiversityMonitor(exclude=["nope"])._resolve(model)


def test_without_matplotlib_figures_are_left_out_with_one_warning_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib is optional: a TensorBoard run without it warns in setup and still trains and logs."""
    import sys

    from lightning.pytorch.loggers import TensorBoardLogger

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monitor = NeuronDiversityMonitor(metrics=["min_angle"])
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[monitor], logger=TensorBoardLogger(tmp_path))
    with pytest.warns(UserWarning, match="matplotlib is not installed; the angle figures are left out"):
        trainer.fit(TinyNet(), tiny_loader())
    acc = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "hsu/fc1/min_angle" in acc.Tags()["scalars"] and not acc.Tags()["images"]
