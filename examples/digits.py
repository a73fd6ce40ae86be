"""Shared pieces of the examples: scikit-learn's digits as tensors, and a small CNN to train on them.

The digits ship inside scikit-learn (1,797 grey 8×8 images, 10 classes), so every example runs
offline in seconds to minutes on a CPU. ``DigitsCNN`` is an ordinary LightningModule that knows
nothing about hyperspherical uniformity: the examples add the regulariser from the outside
(callback, CLI) or through the mixin, which is the point being demonstrated.

The examples import this file as ``digits`` (Python puts a script's own folder on ``sys.path``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: Fraction of the digits held out as the test set (stratified, fixed split).
TEST_FRACTION = 0.4
#: The split never depends on the training seed, so runs with different seeds share one test set.
SPLIT_SEED = 0


def digits_tensors(limit: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` datasets of ``[N, 1, 8, 8]`` float images in [0, 1] and int64 labels.

    ``limit`` keeps only the first ``limit`` samples of each split (smoke runs).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )

    def as_dataset(features, labels) -> TensorDataset:
        images = torch.tensor(features, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # pixels are 0..16
        targets = torch.tensor(labels, dtype=torch.long)
        if limit is not None:
            images, targets = images[:limit], targets[:limit]
        return TensorDataset(images, targets)

    return as_dataset(x_train, y_train), as_dataset(x_test, y_test)


class DigitsDataModule(pl.LightningDataModule):
    """The digits split as a DataModule (used by the CLI example; others build loaders directly)."""

    def __init__(self, batch_size: int = 64, limit: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.limit = limit
        self.seed = seed

    def setup(self, stage: str) -> None:
        self.train_set, self.test_set = digits_tensors(self.limit)

    def train_dataloader(self) -> DataLoader:
        # A seeded generator: the shuffling order is part of what a seed reproduces.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class DigitsCNN(pl.LightningModule):
    """conv(1→c) → BN → ReLU → conv(c→2c) → BN → ReLU → max-pool → fc(2c·16→h) → ReLU → classifier(h→10).

    BatchNorm after the convolutions follows the papers' CNNs: it makes the convolution's output
    independent of its neurons' norms, so only their directions, which the regularisers act on,
    matter. ``classifier`` is the last ``nn.Linear``, which ``classifier="auto"`` picks.

    Args:
        channels: width ``c`` of the first convolution (the second has ``2c``).
        hidden: width of the fully connected hidden layer.
        lr, momentum, weight_decay: SGD, as in the papers' CIFAR set-ups.
        max_epochs_hint: epochs of the cosine learning-rate decay (set it to ``max_epochs``).
    """

    def __init__(
        self,
        channels: int = 16,
        hidden: int = 64,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        max_epochs_hint: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Plain attributes as well as hparams: a subclass that calls save_hyperparameters() for its
        # own arguments (examples/mixin_manual.py) replaces self.hparams.
        self.lr, self.momentum, self.weight_decay, self.max_epochs_hint = lr, momentum, weight_decay, max_epochs_hint
        c = channels
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c * 4 * 4, hidden)
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.max_pool2d(torch.relu(self.bn2(self.conv2(h))), 2)
        return self.classifier(torch.relu(self.fc(h.flatten(1))))

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):  # type: ignore[override]
        self._evaluate(batch, "test")

    def configure_optimizers(self):  # type: ignore[override]
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.max_epochs_hint))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def loaders(batch_size: int = 64, limit: int | None = None, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """``(train, test)`` loaders; the training order is fixed by ``seed``."""
    train, test = digits_tensors(limit)
    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(test, batch_size=256),
    )


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and advice about this tiny set-up (data loader workers,
    logging intervals, the LeafSpec deprecation), so that an example's own output stays readable.
    Real errors and the library's own warnings still show."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")


def quiet_trainer_kwargs() -> dict:
    """Trainer options shared by the examples: CPU, no checkpoints or progress bars cluttering a terminal."""
    return dict(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
