"""Minimum pairwise angle of features over an epoch (the Tammes objective)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_hsu.functional.diversity import minimum_angle
from lightning_hsu.metrics.base import FeatureSampleMetric


class FeatureMinimumAngle(FeatureSampleMetric):
    r"""Smallest angle \(\min_{i<j}\arccos(\hat x_i\cdot\hat x_j)\) in degrees between feature vectors.

    The separation that MHS maximises for neurons (Liu et al., *Learning with Hyperspherical
    Uniformity*, AISTATS 2021), here over a bounded sample of at most ``max_samples`` rows; by
    `lightning_hsu.functional.minimum_angle`. On a sample it is an upper bound of the
    minimum over all rows seen.

    Args:
        half_space: angle between lines, \(\arccos|\hat x_i\cdot\hat x_j|\).
        max_samples: cap on the rows kept per process and used for the value.
        seed: seed of the sample's hash.
        chunk_size: rows per block (``None``: automatic).
    """

    higher_is_better = True

    def __init__(
        self,
        half_space: bool = False,
        max_samples: int = 4096,
        seed: int = 0,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_samples=max_samples, seed=seed, **kwargs)
        self.half_space = bool(half_space)
        self.chunk_size = chunk_size

    def _compute_on(self, rows: Tensor) -> Tensor:
        return minimum_angle(rows, half_space=self.half_space, chunk_size=self.chunk_size)
