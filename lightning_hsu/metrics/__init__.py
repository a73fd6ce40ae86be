"""torchmetrics metrics of feature diversity (embeddings, penultimate activations).

Each accumulates a bounded, seeded sample of rows over an epoch (``max_samples``), synchronises
across DDP ranks and computes with the functional core in `lightning_hsu.functional`.
"""

from lightning_hsu.metrics.angle import FeatureMinimumAngle
from lightning_hsu.metrics.base import FeatureSampleMetric
from lightning_hsu.metrics.energy import FeatureEnergy
from lightning_hsu.metrics.uniformity import FeatureUniformity

__all__ = ["FeatureEnergy", "FeatureMinimumAngle", "FeatureSampleMetric", "FeatureUniformity"]
