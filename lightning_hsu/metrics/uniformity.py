"""Uniformity of features over an epoch (Wang & Isola, ICML 2020)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_hsu.functional.uniformity import uniformity
from lightning_hsu.metrics.base import FeatureSampleMetric
from lightning_hsu.validation import positive_float


class FeatureUniformity(FeatureSampleMetric):
    r"""Wang–Isola uniformity \(\log\frac{1}{P}\sum_{i<j} e^{-t\lVert\hat x_i-\hat x_j\rVert^2}\) of features.

    Wang & Isola, *Understanding Contrastive Representation Learning through Alignment and
    Uniformity on the Hypersphere*, ICML 2020. Lower is more uniform (about \(-2t\) at best in
    high dimension). Computed by `lightning_hsu.functional.uniformity` on a bounded sample of
    at most ``max_samples`` rows (see `FeatureSampleMetric`).

    Args:
        t: kernel temperature (the paper's 2).
        max_samples: cap on the rows kept per process and used for the value.
        seed: seed of the sample's hash.
        chunk_size: rows per block of the pairwise sum (``None``: automatic).
    """

    higher_is_better = False

    def __init__(
        self, t: float = 2.0, max_samples: int = 4096, seed: int = 0, chunk_size: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(max_samples=max_samples, seed=seed, **kwargs)
        self.t = positive_float("FeatureUniformity", "t", t)
        self.chunk_size = chunk_size

    def _compute_on(self, rows: Tensor) -> Tensor:
        return uniformity(rows, t=self.t, chunk_size=self.chunk_size)
