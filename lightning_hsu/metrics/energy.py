"""Hyperspherical energy of features over an epoch (Liu et al., NeurIPS 2018)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lightning_hsu.functional.energy import hyperspherical_energy
from lightning_hsu.functional.kernels import energy_kernel
from lightning_hsu.metrics.base import FeatureSampleMetric


class FeatureEnergy(FeatureSampleMetric):
    r"""Mean pair hyperspherical energy of features.

    \(E_s = \frac{1}{P}\sum_{i<j} f_s(\operatorname{dist}(\hat x_i,\hat x_j))\), \(P = N(N-1)/2\).

    Liu et al., *Learning towards Minimum Hyperspherical Energy*, NeurIPS 2018, applied to feature
    vectors instead of neurons; lower is more diverse. Computed by
    `lightning_hsu.functional.hyperspherical_energy` (same conventions as the MHE
    regulariser) on a bounded sample of at most ``max_samples`` rows.

    Args:
        power: Riesz exponent \(s \ge 0\) (0: log energy).
        distance: ``'euclidean'`` (chordal) or ``'angular'``.
        max_samples: cap on the rows kept per process and used for the value.
        seed: seed of the sample's hash.
        chunk_size: rows per block (``None``: automatic).
    """

    higher_is_better = False

    def __init__(
        self,
        power: float = 2.0,
        distance: Literal["euclidean", "angular"] = "euclidean",
        max_samples: int = 4096,
        seed: int = 0,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_samples=max_samples, seed=seed, **kwargs)
        energy_kernel(power, distance)  # validates both now rather than at the end of an epoch
        self.power = float(power)
        self.distance = distance
        self.chunk_size = chunk_size

    def _compute_on(self, rows: Tensor) -> Tensor:
        return hyperspherical_energy(rows, power=self.power, distance=self.distance, chunk_size=self.chunk_size)
