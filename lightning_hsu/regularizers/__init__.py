"""Regularizer objects: ``penalty = MHE(power=2, half_space=True)(neurons)``."""

from lightning_hsu.regularizers.base import Capturable, Regularizer
from lightning_hsu.regularizers.compressive import CoMHE
from lightning_hsu.regularizers.covering import MHC
from lightning_hsu.regularizers.energy import MHE
from lightning_hsu.regularizers.gram_determinant import MGD
from lightning_hsu.regularizers.polarization import MHP, RMHP
from lightning_hsu.regularizers.pole import PoleRegularizer
from lightning_hsu.regularizers.registry import REGULARIZERS, make_regularizer
from lightning_hsu.regularizers.separation import MHS
from lightning_hsu.regularizers.uniformity import Uniformity

__all__ = [
    "MGD",
    "MHC",
    "MHE",
    "MHP",
    "MHS",
    "REGULARIZERS",
    "RMHP",
    "Capturable",
    "CoMHE",
    "PoleRegularizer",
    "Regularizer",
    "Uniformity",
    "make_regularizer",
]
