"""Tiny models and a hand-written reference for the callback tests."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hsu.functional import hyperspherical_energy, neurons_of


def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return TensorDataset(x, y)


class TinyNet(pl.LightningModule):
    """conv -> relu(inplace) -> linear -> relu -> linear (classifier)."""

    def __init__(self, lr: float = 0.1, penalty: Callable[[pl.LightningModule], torch.Tensor] | None = None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU(inplace=True)
        self.hidden = nn.Linear(4 * 4 * 4, 8)
        self.fc = nn.Linear(8, 5)
        self.lr = lr
        self.penalty = penalty  # the hand-written reference: loss + penalty(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x)).flatten(1)
        return self.fc(torch.relu(self.hidden(h)))

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.penalty is not None:
            loss = loss + self.penalty(self)
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):  # type: ignore[override]
        return self(batch[0])

    def configure_optimizers(self):  # type: ignore[override]
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(), batch_size=16, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_data(32, seed=1), batch_size=16)


def mhe_reference(lam_hidden: float = 1.0, lam_fc: float = 10.0) -> Callable[[pl.LightningModule], torch.Tensor]:
    """The papers' MHE preset written by hand: half-space on conv/hidden, full space on fc."""

    def penalty(m: pl.LightningModule) -> torch.Tensor:
        hidden = sum(
            hyperspherical_energy(neurons_of(layer), power=2.0, half_space=True) for layer in (m.conv, m.hidden)
        )
        return lam_hidden * hidden + lam_fc * hyperspherical_energy(neurons_of(m.fc), power=2.0)

    return penalty


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kw = dict(
        default_root_dir=tmp_path,
        max_steps=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    kw.update(overrides)
    return kw


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in module.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
