"""Hyperspherical-uniformity regularisation (MHE, MHS, MHP, MHC, MGD, R-MHP, CoMHE, uniformity)
for PyTorch Lightning."""

__version__ = "0.1.0"
