"""The monitor's histograms and figures reach W&B (offline) and MLflow (a local file store) through
their real packages, as they reach TensorBoard: native histograms where the logger has them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_hsu.callbacks import NeuronDiversityMonitor

from .conftest import TinyNet, quiet_trainer, tiny_loader


def test_wandb_offline_run_receives_native_histograms_figure_and_scalars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="hsu", save_dir=str(tmp_path), offline=True)
    logged: list[dict[str, object]] = []
    real_log = logger.experiment.log

    def spy(data, *args, **kwargs):  # type: ignore[no-untyped-def]
        logged.append(dict(data))  # what the real run.log receives, then passed on to it
        return real_log(data, *args, **kwargs)

    monkeypatch.setattr(logger.experiment, "log", spy)
    monitor = NeuronDiversityMonitor(metrics=["min_angle"])
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[monitor], logger=logger)
    trainer.fit(TinyNet(), tiny_loader())
    wandb.finish()
    histogram = next(row["hsu/diversity/fc1/angles"] for row in logged if "hsu/diversity/fc1/angles" in row)
    assert isinstance(histogram, wandb.Histogram)
    assert sum(histogram.histogram) == 16 * 15 // 2  # fc1: 16 neurons, every pair counted once
    assert any(isinstance(row.get("hsu/diversity/angle_distributions"), list) for row in logged)  # the figure
    assert any("hsu/diversity/fc1/min_angle" in row for row in logged)
    assert list(tmp_path.rglob("*.wandb"))  # the offline run was written


def test_mlflow_local_run_receives_the_figure_as_an_artifact_and_the_scalars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store, no server
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="hsu", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    monitor = NeuronDiversityMonitor(metrics=["min_angle"])
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[monitor], logger=logger)
    trainer.fit(TinyNet(), tiny_loader())
    run = tmp_path / "mlruns" / logger.experiment_id / logger.run_id
    figures = sorted((run / "artifacts" / "hsu" / "diversity" / "angle_distributions").glob("step_*.png"))
    assert figures and figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "metrics" / "hsu" / "diversity" / "fc1" / "min_angle").is_file()
