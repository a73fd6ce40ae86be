"""MHP and MHC: regularizers that play a game against a learnable pole (Liu et al., AISTATS 2021).

Each layer owns a pole \\(v\\in\\mathbb{R}^d\\) (init N(0, 1), seeded) and the pole's own SGD
optimiser (momentum 0.9, weight decay 5e-4, as the official ``mhp/train.py``). At each training
step the pole first takes ``inner_steps`` steps against the detached neurons, then the neurons'
penalty is evaluated against the detached pole. With the same weights and seed every rank
computes the same pole, so no communication is needed under DDP/FSDP.

The pole and its optimiser state are training state: `PoleRegularizer.state_dict` returns
them (tensors and primitives only) for the callback's checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_hsu.functional._common import DEFAULT_EPS, check_neurons, row_normalization
from lightning_hsu.functional._matmul import serial_passes
from lightning_hsu.regularizers.base import Regularizer
from lightning_hsu.validation import flag, integer, positive_float, positive_int


class PoleRegularizer(Regularizer):
    """Shared machinery of `MHP` and `MHC`: the pole, its optimiser, its state."""

    stateful = True

    def __init__(
        self,
        half_space: bool = False,
        inner_steps: int = 10,
        pole_lr: float = 0.1,
        pole_momentum: float = 0.9,
        pole_weight_decay: float = 5e-4,
        seed: int = 0,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.half_space = flag(owner, "half_space", half_space)
        self.inner_steps = positive_int(owner, "inner_steps", inner_steps)
        self.pole_lr = positive_float(owner, "pole_lr", pole_lr)
        self.pole_momentum = positive_float(owner, "pole_momentum", pole_momentum, allow_zero=True)
        self.pole_weight_decay = positive_float(owner, "pole_weight_decay", pole_weight_decay, allow_zero=True)
        self.seed = integer(owner, "seed", seed)
        self.eps = positive_float(owner, "eps", eps)
        self._pole: Tensor | None = None
        self._optimizer: torch.optim.SGD | None = None
        self._last_step: int | None = None

    # -- the game ---------------------------------------------------------------------------
    def pole_objective(self, neurons: Tensor, pole: Tensor, *, normalized: bool = False) -> Tensor:
        """What the pole minimises (``normalized``: the neurons are normalised and checked already)."""
        raise NotImplementedError

    def pole_slope(self, cos: Tensor) -> Tensor | None:
        """\\(\\partial/\\partial c_i\\) of `pole_objective` at the pole's ``[N]`` cosines (the
        ``[c, -c]`` of `pole_cosines` in half space),
        or ``None`` for a game whose objective is not a function of those cosines alone: its pole
        steps then differentiate `pole_objective` with autograd."""
        return None

    def neuron_penalty(self, neurons: Tensor, pole: Tensor) -> Tensor:
        """What the neurons minimise, for a fixed pole."""
        raise NotImplementedError

    @property
    def pole(self) -> Tensor | None:
        """The current pole (``None`` before the first call or load)."""
        return self._pole

    def _new_optimizer(self, pole: Tensor) -> torch.optim.SGD:
        return torch.optim.SGD(
            [pole], lr=self.pole_lr, momentum=self.pole_momentum, weight_decay=self.pole_weight_decay
        )

    def _ensure_pole(self, dim: int, device: torch.device) -> Tensor:
        if self._pole is None:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.salt) % (2**63))
            self._pole = torch.randn(dim, generator=generator).to(device).requires_grad_(True)
            self._optimizer = self._new_optimizer(self._pole)
        elif self._pole.shape != (dim,):
            raise ValueError(
                f"{type(self).__name__}: the pole has dimension {self._pole.shape[0]} but the layer's "
                f"neurons have dimension {dim} (a checkpoint from another model?)"
            )
        elif self._pole.device != device:
            assert self._optimizer is not None
            state = self._optimizer.state_dict()
            self._pole = self._pole.detach().to(device).requires_grad_(True)
            self._optimizer = self._new_optimizer(self._pole)
            self._optimizer.load_state_dict(state)
        return self._pole

    def update_pole(self, neurons: Tensor) -> None:
        """Take ``inner_steps`` optimiser steps of the pole against the (detached) neurons.

        Each step's gradient of `pole_objective` is formed in closed form, as the pair sums
        form theirs: with \\(c = \\hat W\\hat v\\) and \\(\\hat v = r v\\),
        \\(g = \\hat W^\\top \\partial_c\\) and \\(\\partial/\\partial v = r(g - (g\\cdot\\hat v)\\hat v)\\)
        (`row_normalization`, divisor included). An
        autograd graph per step cost three times as much on small layers (~40 dispatched
        operations per step for a few thousand multiply-adds).
        """
        pole = self._ensure_pole(neurons.shape[-1], neurons.device)
        assert self._optimizer is not None
        # the neurons stay fixed during the pole's steps: normalised and checked once, so the
        # steps make no host sync (on a GPU each stalled the queue: 4 per step); the unit rows
        # r w are not formed: r goes into the n cosines and slopes instead of n x d entries
        rows, r, _, _ = row_normalization(check_neurons(neurons.detach()), self.eps)
        for _ in range(self.inner_steps):
            pole.grad = self._pole_gradient(rows, r[:, 0], pole)
            self._optimizer.step()

    @torch.no_grad()
    def _pole_gradient(self, rows: Tensor, r: Tensor, pole: Tensor) -> Tensor:
        """The gradient of `pole_objective` with respect to the raw pole, against the unit neurons
        ``rows * r[:, None]`` (`row_normalization`'s factors, ``r`` of shape ``[n]``)."""
        v = pole.detach().to(rows.dtype).unsqueeze(0)
        v_rows, v_r, _, divisor = row_normalization(v, self.eps, check_finite=False)
        unit = (v_rows * v_r)[0]
        cos = (rows @ unit).mul_(r)
        slope = self.pole_slope(torch.cat([cos, -cos]) if self.half_space else cos)
        if slope is None:  # a game without a closed form: autograd of its objective
            target = rows * r.unsqueeze(-1)
            with torch.enable_grad():
                leaf = pole.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.pole_objective(target, leaf, normalized=True), leaf)
            return grad
        if self.half_space:
            n = rows.shape[0]
            slope = slope[:n] - slope[n:]
        grad = rows.T @ (slope * r)
        grad = (grad - grad.dot(unit) * unit) * v_r[0]
        assert divisor is not None  # always given with check_finite=False
        return (grad / divisor[0]).to(pole.dtype)

    @serial_passes  # the pole's steps are dozens of small operations, each a barrier of the pool
    def penalty(self, neurons: Tensor, *, step: int | None = None, check_finite: bool = True) -> Tensor:
        # The pole moves once per training step (official: before the weights' update), not once
        # per micro-batch under gradient accumulation nor again when a shared layer recurs.
        if step is None or step != self._last_step:
            self.update_pole(neurons)
            self._last_step = step
        pole = self._ensure_pole(neurons.shape[-1], neurons.device)
        return self.neuron_penalty(neurons, pole.detach())

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._pole is None:
            return {}
        assert self._optimizer is not None
        return {
            "pole": self._pole.detach().cpu().clone(),
            "optimizer": self._optimizer.state_dict(),
            "last_step": -1 if self._last_step is None else self._last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        pole = state["pole"]
        device = self._pole.device if self._pole is not None else pole.device
        self._pole = pole.detach().clone().to(device).requires_grad_(True)
        self._optimizer = self._new_optimizer(self._pole)
        self._optimizer.load_state_dict(state["optimizer"])
        last = int(state.get("last_step", -1))
        self._last_step = None if last < 0 else last
