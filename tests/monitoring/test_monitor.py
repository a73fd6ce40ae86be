"""NeuronDiversityMonitor: keys through a CSV logger, histograms and figures through TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_hsu.callbacks import HypersphericalUniformity, NeuronDiversityMonitor
from lightning_hsu.functional import neurons_of
from lightning_hsu.functional.diversity import DIVERSITY_METRICS, diversity_summary

from .conftest import Run, TinyNet, quiet_trainer, tiny_loader

LAYERS = ("fc1", "conv", "head")
QUANTILE_KEYS = ("angle_p5", "angle_p50", "angle_p95")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_gets_every_metric_and_quantiles(trained_run: Run) -> None:
    rows = [r for r in read_csv(trained_run.csv_dir / "metrics.csv") if r.get("hsu/diversity/fc1/min_angle")]
    # Lightning's steps: the start of training → 0; every_n_steps=3 (global step 3, the 3rd batch) → 2;
    # epoch end → 3, the step of Lightning's own epoch-end row.
    assert [int(r["step"]) for r in rows] == [0, 2, 3]
    assert [r["epoch"] for r in rows] == ["0", "0", "0"]
    expected = {f"hsu/diversity/{layer}/{m}" for layer in LAYERS for m in (*DIVERSITY_METRICS, *QUANTILE_KEYS)}
    present = {k for k in rows[0] if k.startswith("hsu/")}
    assert present == expected  # no LayerNorm: 1-D weight; no histograms in a CSV
    # The last row is the final weights' summary.
    for layer in LAYERS:
        module = getattr(trained_run.model, layer)
        summary = diversity_summary(neurons_of(module, name=layer))
        for metric, value in summary.items():
            assert float(rows[-1][f"hsu/diversity/{layer}/{metric}"]) == pytest.approx(value, rel=1e-4, abs=1e-4), (
                metric
            )
    # The user's own metric is untouched by the monitor.
    assert any(r.get("train_loss") for r in read_csv(trained_run.csv_dir / "metrics.csv"))


def test_tensorboard_gets_histograms_figure_and_scalars(trained_run: Run) -> None:
    acc = EventAccumulator(str(trained_run.tb_dir), size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for layer in LAYERS:
        assert f"hsu/diversity/{layer}/angles" in tags["histograms"]
        assert f"hsu/diversity/{layer}/min_angle" in tags["scalars"]
        assert f"hsu/diversity/{layer}/angle_p50" not in tags["scalars"]  # TensorBoard has the histogram instead
    assert "hsu/diversity/angle_distributions" in tags["images"]
    events = acc.Histograms("hsu/diversity/conv/angles")
    assert [e.step for e in events] == [0, 2, 3]
    hist = events[-1].histogram_value
    n = trained_run.model.conv.out_channels
    assert hist.num == n * (n - 1) // 2
    assert sum(hist.bucket) == hist.num
    assert len(hist.bucket) == 12 and hist.bucket_limit[-1] == pytest.approx(180.0)
    scalar = acc.Scalars("hsu/diversity/head/min_angle")[-1].value
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
    assert "hsu/diversity/fc1/min_angle" in acc.Tags()["scalars"] and not acc.Tags()["images"]


class EpochLoggingNet(TinyNet):
    """Logs a value of its own at epoch end, to compare the monitor's rows with Lightning's."""

    def on_train_epoch_end(self) -> None:
        self.log("own_epoch_value", 1.0)


def test_monitor_rows_have_lightnings_epoch_end_step_and_epoch_and_a_start_snapshot(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = EpochLoggingNet()
    initial = model.fc1.weight.detach().clone()
    logger = CSVLogger(tmp_path, name="run", version=0)
    monitor = NeuronDiversityMonitor(metrics=["min_angle"], log_figures=False)
    quiet_trainer(tmp_path, max_epochs=2, logger=logger, callbacks=[monitor]).fit(model, tiny_loader())
    rows = read_csv(Path(logger.log_dir) / "metrics.csv")
    own = [(r["epoch"], r["step"]) for r in rows if r.get("own_epoch_value")]
    ours = [(r["epoch"], r["step"]) for r in rows if r.get("hsu/diversity/fc1/min_angle")]
    assert own == [("0", "3"), ("1", "7")]
    assert ours == [("0", "0"), *own]  # the start of training, then each epoch end where Lightning writes its own
    start = next(r for r in rows if r.get("hsu/diversity/fc1/min_angle"))
    expected = diversity_summary(initial, metrics=["min_angle"])["min_angle"]
    assert float(start["hsu/diversity/fc1/min_angle"]) == pytest.approx(expected, rel=1e-4)


def test_early_stopping_can_monitor_a_diversity_metric(tmp_path: Path) -> None:
    """The monitor's scalars reach `callback_metrics`: a metric that cannot improve (a frozen layer's) stops the run."""
    model = TinyNet()
    model.fc1.requires_grad_(False)
    stopper = EarlyStopping(monitor="hsu/diversity/fc1/min_angle", mode="max", patience=0)
    monitor = NeuronDiversityMonitor(layers=["fc1"], metrics=["min_angle"], log_figures=False)
    trainer = quiet_trainer(tmp_path, max_epochs=5, logger=CSVLogger(tmp_path), callbacks=[monitor, stopper])
    trainer.fit(model, tiny_loader())
    assert "hsu/diversity/fc1/min_angle" in trainer.callback_metrics
    assert stopper.stopped_epoch == 1 and trainer.current_epoch == 2  # best at epoch 0, no improvement at 1


def test_layers_are_measured_in_the_space_their_rules_regularise(tmp_path: Path) -> None:
    """With the preset attached, hidden layers are measured in half space and the classifier in full space."""
    model = TinyNet()
    initial = {name: getattr(model, name).weight.detach().clone() for name in LAYERS}
    follow = NeuronDiversityMonitor(metrics=["min_angle", "energy"], log_figures=False)
    regulariser = HypersphericalUniformity(preset="mhe", layers=["fc1", "conv", "head"], verbose=False)
    trainer = quiet_trainer(tmp_path, max_steps=1, logger=CSVLogger(tmp_path), callbacks=[follow, regulariser])
    trainer.fit(model, tiny_loader())
    assert follow._half == {"fc1": True, "conv": True, "head": False}
    rows = read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    start = next(r for r in rows if r.get("hsu/diversity/fc1/min_angle"))
    for name, half in follow._half.items():
        expected = diversity_summary(neurons_of(initial[name]), half_space=half)
        assert float(start[f"hsu/diversity/{name}/min_angle"]) == pytest.approx(expected["min_angle"], rel=1e-4), name

    forced = NeuronDiversityMonitor(half_space=False)
    forced._selected = forced._resolve(model)
    assert forced._spaces(model) == dict.fromkeys(LAYERS, False)  # an explicit space wins over the rules


@pytest.mark.distributed
def test_early_stopping_on_a_diversity_metric_stops_every_rank_under_ddp(tmp_path: Path) -> None:
    """Rank 0 profiles, every rank logs the broadcast values: EarlyStopping finds the metric on both
    ranks (with `strict=True` a rank without it would fail) and both stop after the second epoch."""
    model = TinyNet()
    model.fc1.requires_grad_(False)
    stopper = EarlyStopping(monitor="hsu/diversity/fc1/min_angle", mode="max", patience=0)
    monitor = NeuronDiversityMonitor(layers=["fc1"], metrics=["min_angle"], log_figures=False)
    logger = CSVLogger(tmp_path, name="ddp", version=0)
    trainer = quiet_trainer(
        tmp_path, max_epochs=5, logger=logger, callbacks=[monitor, stopper], strategy="ddp_spawn", devices=2
    )
    trainer.fit(model, tiny_loader())
    rows = [r for r in read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("hsu/diversity/fc1/min_angle")]
    assert [r["epoch"] for r in rows] == ["0", "0", "1"]  # the start, then epochs 0 and 1: stopped
    assert "hsu/diversity/fc1/min_angle" in trainer.callback_metrics


def test_logger_step_is_lightnings_count_of_stepped_batches_or_the_global_step_without_it() -> None:
    """The step the monitor writes at: Lightning's batches-that-stepped count (which differs from
    `global_step` with two optimizers), one less at epoch end; the global step on a Lightning
    without that private count."""
    from types import SimpleNamespace

    with_count = SimpleNamespace(
        global_step=10, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=5))
    )
    without = SimpleNamespace(global_step=10, fit_loop=SimpleNamespace())
    step = NeuronDiversityMonitor._logger_step
    assert (step(with_count, "batch"), step(with_count, "epoch"), step(with_count, "start")) == (5, 4, 5)
    assert (step(without, "batch"), step(without, "epoch"), step(without, "start")) == (10, 9, 10)
