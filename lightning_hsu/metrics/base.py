"""The base of the feature metrics: accumulate a bounded sample of rows, compute on it."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat

from lightning_hsu.metrics._sample import bottom_k
from lightning_hsu.validation import int_at_least, integer


class FeatureSampleMetric(Metric):
    """Accumulates feature rows ``[batch, d]`` over an epoch and computes a pairwise metric on them.

    Memory is bounded by ``max_samples`` rows per process: the kept rows are the bottom-k sample
    of `lightning_hsu.metrics._sample` (seeded by ``seed``), uniform over the rows seen and
    independent of how they were split across DDP ranks or batches, so a DDP run gives the same
    value as one process over the same data. Rows are stored in float32. Rows of all ranks are
    gathered with ``dist_reduce_fx="cat"`` and cut to ``max_samples`` again before computing.

    Subclasses implement `_compute_on` for the ``[N, d]`` sample.
    """

    is_differentiable = False
    full_state_update = False
    rows: list[Tensor]
    dim: Tensor

    def __init__(self, max_samples: int = 4096, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_samples = int_at_least(type(self).__name__, "max_samples", max_samples, 2)
        self.seed = integer(type(self).__name__, "seed", seed)
        # Rows are kept flattened (1-D): a rank that saw no data then contributes torchmetrics'
        # empty 1-D placeholder of the same dtype and rank, which every gather accepts.
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("dim", default=torch.tensor(0), dist_reduce_fx="max")

    def update(self, features: Tensor) -> None:
        """Add a batch of feature vectors ``[batch, d]`` (embeddings, penultimate activations)."""
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise TypeError(f"features must be a floating-point torch.Tensor, got {features!r:.80}")
        if features.dim() != 2:
            raise ValueError(
                f"features must have shape [batch, d], got {tuple(features.shape)}; "
                "pool or flatten spatial dimensions first"
            )
        d = features.shape[1]
        if d == 0:
            raise ValueError("features have dimension d = 0")
        if int(self.dim) not in (0, d):
            raise ValueError(f"features have dimension {d}, but earlier updates had {int(self.dim)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or inf")
        self.dim = torch.tensor(d, device=self.dim.device)
        stored = self._stored()
        new = features.detach().to(dtype=torch.float32)
        merged = new if stored.shape[0] == 0 else torch.cat([stored, new])
        if merged.shape[0] > self.max_samples:
            merged = bottom_k(merged, self.max_samples, self.seed)
        self.rows = [merged.reshape(-1)]

    def _stored(self) -> Tensor:
        d = int(self.dim)
        # A list between updates; one tensor (the "cat" of every rank's rows) after a DDP sync.
        rows = self.rows
        if d == 0 or (isinstance(rows, list) and not rows):
            return torch.empty(0, max(d, 1), device=self.dim.device)
        return dim_zero_cat(rows).to(torch.float32).reshape(-1, d)

    def sample(self) -> Tensor:
        """The kept rows ``[N, d]`` (``N <= max_samples``), in the canonical (key) order."""
        return bottom_k(self._stored(), self.max_samples, self.seed)

    def compute(self) -> Tensor:
        rows = self.sample()
        if rows.shape[0] < 2:
            rank_zero_warn(f"{type(self).__name__} needs at least 2 feature rows, got {rows.shape[0]}; returning NaN")
            return torch.tensor(math.nan)
        return self._compute_on(rows)

    def _compute_on(self, rows: Tensor) -> Tensor:
        raise NotImplementedError
