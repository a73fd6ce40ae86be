"""Lightning callbacks of lightning_hsu."""

from lightning_hsu.callbacks.monitor import NeuronDiversityMonitor
from lightning_hsu.callbacks.uniformity import HypersphericalUniformity

__all__ = ["HypersphericalUniformity", "NeuronDiversityMonitor"]
