"""Regularizer objects: ``penalty = MHE(power=2, half_space=True)(neurons)``."""

from lightning_hsu.regularizers.base import Regularizer
from lightning_hsu.regularizers.energy import MHE, CoMHE, Uniformity
from lightning_hsu.regularizers.pole import MHC, MHP, PoleRegularizer
from lightning_hsu.regularizers.registry import REGULARIZERS, make_regularizer
from lightning_hsu.regularizers.separation import MGD, MHS, RMHP

__all__ = [
    "MGD",
    "MHC",
    "MHE",
    "MHP",
    "MHS",
    "REGULARIZERS",
    "RMHP",
    "CoMHE",
    "PoleRegularizer",
    "Regularizer",
    "Uniformity",
    "make_regularizer",
]
