"""Picklable helpers for the training tests (``ddp_spawn`` pickles the model and the callbacks, so
they live in an importable module rather than in a test file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from models import TinyNet, make_data
from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """An unshuffled DataLoader that Lightning can resume mid-epoch.

    Lightning 2.6 restores the position inside an epoch only for loaders with ``state_dict`` /
    ``load_state_dict`` (``_Stateful``); a plain DataLoader restarts the epoch from its first batch
    (with a ``PossibleUserWarning``), so a resumed run would see other batches than an
    uninterrupted one. This loader records how many batches it has handed out and skips them after
    a restore.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0
        self._yielded = 0

    def __iter__(self):  # type: ignore[override]
        skip, self._skip = self._skip, 0
        self._yielded = 0
        for index, batch in enumerate(super().__iter__()):
            if index < skip:
                continue
            self._yielded = index + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["yielded"])


class ResumableNet(TinyNet):
    """TinyNet (4 batches per epoch) fed by a :class:`ResumableLoader`."""

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(make_data(), batch_size=16, shuffle=False)


class FailAt(pl.Callback):
    """Kill the run with an exception at the start of global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected fault at global step {self.step}")


class AtStep(pl.Callback):
    """Run ``action(pl_module)`` at the start of global step ``step`` (e.g. corrupt a weight)."""

    def __init__(self, step: int, action: Any) -> None:
        self.step = step
        self.action = action
        self.before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                self.action(pl_module)
            self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class GatherOnEnd(pl.Callback):
    """At the end of training every rank contributes its flattened weights and its MHP poles to an
    ``all_gather``; rank 0 saves the ``[world_size, ...]`` tensors to ``path``."""

    def __init__(self, path: str | Path, uniformity: Any) -> None:
        self.path = str(path)
        self.uniformity = uniformity

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        state = self.uniformity.state_dict()["regularizers"]
        poles = torch.cat([state[key]["pole"].flatten() for key in sorted(state)])
        gathered = {"weights": pl_module.all_gather(flat), "poles": pl_module.all_gather(poles)}
        if trainer.global_rank == 0:
            torch.save({k: v.cpu() for k, v in gathered.items()}, self.path)
