"""Lightning callbacks of lightning_hsu."""

from lightning_hsu.callbacks.uniformity import HypersphericalUniformity

__all__ = ["HypersphericalUniformity"]
