"""One tiny training run shared by the monitor and report tests (Trainer start-up is the slow part)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_hsu.callbacks import NeuronDiversityMonitor


class TinyNet(pl.LightningModule):
    """Linear → Conv1d → Linear, with a LayerNorm (1-D weight, never a layer of neurons)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.conv = nn.Conv1d(2, 5, kernel_size=3)
        self.norm = nn.LayerNorm(30)
        self.head = nn.Linear(30, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)).view(-1, 2, 8)
        h = self.norm(torch.relu(self.conv(h)).flatten(1))
        return self.head(h)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tiny_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def quiet_trainer(root: Path, **kwargs: object) -> pl.Trainer:
    kwargs.setdefault("devices", 1)
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **kwargs,
    )


@dataclass
class Run:
    model: TinyNet
    csv_dir: Path
    tb_dir: Path
    checkpoint: Path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """4 steps (one epoch of 4 batches) with the monitor every 3 steps and at epoch end, a CSV and a
    TensorBoard logger, and a checkpoint at the end."""
    root = tmp_path_factory.mktemp("run")
    pl.seed_everything(0, verbose=False)
    model = TinyNet()
    csv = CSVLogger(root, name="csv", version=0)
    tb = TensorBoardLogger(root, name="tb", version=0)
    monitor = NeuronDiversityMonitor(every_n_steps=3, log_at_epoch_end=True, histogram_bins=12)
    trainer = quiet_trainer(
        root,
        max_steps=4,
        logger=[csv, tb],
        callbacks=[monitor, ModelCheckpoint(dirpath=root / "ckpt", filename="last")],
        enable_checkpointing=True,
    )
    trainer.fit(model, tiny_loader())
    return Run(model=model, csv_dir=Path(csv.log_dir), tb_dir=Path(tb.log_dir), checkpoint=root / "ckpt" / "last.ckpt")
