"""Hyperspherical-uniformity regularisation (MHE, MHS, MHP, MHC, MGD, R-MHP, CoMHE, uniformity)
for PyTorch Lightning."""

from lightning_hsu.callbacks.uniformity import HypersphericalUniformity
from lightning_hsu.engine import NonFinitePenaltyError, PenaltyEngine
from lightning_hsu.mixin import HypersphericalUniformityMixin, hyperspherical_penalty
from lightning_hsu.regularizers import MGD, MHC, MHE, MHP, MHS, RMHP, CoMHE, Regularizer, Uniformity
from lightning_hsu.rules import PRESETS, Rule
from lightning_hsu.schedules import Constant, Cosine, LinearWarmup, Schedule, StepDecay

__version__ = "0.1.0"

__all__ = [
    "MGD",
    "MHC",
    "MHE",
    "MHP",
    "MHS",
    "PRESETS",
    "RMHP",
    "CoMHE",
    "Constant",
    "Cosine",
    "HypersphericalUniformity",
    "HypersphericalUniformityMixin",
    "LinearWarmup",
    "NonFinitePenaltyError",
    "PenaltyEngine",
    "Regularizer",
    "Rule",
    "Schedule",
    "StepDecay",
    "Uniformity",
    "hyperspherical_penalty",
]

# -- exports added by other modules below (metrics, monitor) --
from lightning_hsu.callbacks.monitor import NeuronDiversityMonitor
from lightning_hsu.metrics import FeatureEnergy, FeatureMinimumAngle, FeatureUniformity

__all__ += ["FeatureEnergy", "FeatureMinimumAngle", "FeatureUniformity", "NeuronDiversityMonitor"]
