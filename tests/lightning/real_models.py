"""Real architectures built from their libraries' configs (random init, no download), a generic
LightningModule around them, and the papers' MHE preset written by hand on their layers."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from models import trainer_kwargs, weights
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hsu.functional import hyperspherical_energy

#: A batch of a model's inputs and its loss: ``loss_fn(net, batch)``.
LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
#: ``penalty(net)``: the hand-written regulariser added to the loss.
Penalty = Callable[[nn.Module], Tensor]


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*config.*")


class Task(pl.LightningModule):
    """Trains ``net`` on fixed batches with ``loss_fn`` (+ a hand-written ``penalty``)."""

    def __init__(self, net: nn.Module, loss_fn: LossFn, data: TensorDataset, penalty: Penalty | None = None) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.data = data
        self.penalty = penalty

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        loss = self.loss_fn(self.net, batch)
        if self.penalty is not None:
            loss = loss + self.penalty(self.net)
        return loss

    def configure_optimizers(self):  # type: ignore[override]
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4, shuffle=False)


def mhe_penalty(hidden: Callable[[nn.Module], Iterable[Tensor]], classifier: Callable[[nn.Module], Iterable[Tensor]]):
    """The MHE preset by hand: half-space s = 2 with λ = 1 on ``hidden(net)``'s neuron matrices,
    full space with λ = 10 on ``classifier(net)``'s."""

    def penalty(net: nn.Module) -> Tensor:
        total = sum(hyperspherical_energy(w, power=2.0, half_space=True) for w in hidden(net))
        return total + 10.0 * sum(hyperspherical_energy(w, power=2.0) for w in classifier(net))

    return penalty


def train(task: Task, tmp_path, callbacks: list, steps: int = 3, **overrides) -> dict[str, Tensor]:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=steps, callbacks=callbacks, **overrides))
    trainer.fit(task)
    return weights(task.net)


def train_both(
    make_net: Callable[[], nn.Module],
    loss_fn: LossFn,
    data: TensorDataset,
    reference: Penalty,
    callback: pl.Callback,
    tmp_path,
    steps: int = 3,
    **overrides,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Weights after ``steps`` steps with ``callback`` and with ``reference`` written by hand."""
    torch.manual_seed(0)
    net = make_net()
    twin = copy.deepcopy(net)
    got = train(Task(net, loss_fn, data), tmp_path / "callback", [callback], steps, **overrides)
    expected = train(Task(twin, loss_fn, data, reference), tmp_path / "reference", [], steps, **overrides)
    return got, expected


def linear_neurons_by_forward(module: nn.Module, n_in: int) -> Tensor:
    """The rows ``w_i`` with ``y_i = <w_i, x> + b_i``, read off the layer's own forward on the
    unit vectors (independent of how the weight is stored)."""
    with torch.no_grad():
        eye = torch.eye(n_in)
        return (module(eye) - module(torch.zeros(1, n_in))).t()
