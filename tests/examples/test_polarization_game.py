"""The MHP game of `examples/polarization_game.py`: the official pole lags and the neurons
collapse onto it; a pole that keeps up spreads them. These are the claims of
`docs/reproduction_fashion.md` ("MHP")."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from polarization_game import min_angle_degrees, play, simplex_bound


def test_official_pole_lets_the_classifier_collapse():
    record = play(10, 0.1, steps=30)
    assert record[0][0] > 70.0  # nn.Linear's 10 random vectors in 128 dimensions start far apart
    assert record[30][0] < 20.0  # within 30 steps two class vectors are almost parallel
    assert record[10][1] > 1.0  # the pole sits among the neurons (a pole at the emptiest place sees E <= 1/2)


def test_pole_that_keeps_up_spreads_the_classifier():
    record = play(100, 1.0, steps=30)
    assert record[30][0] > record[0][0] + 3.0
    assert all(energy <= 0.5 + 1e-3 for _, energy in record.values())


def test_any_zero_mean_configuration_is_optimal_for_the_game():
    """E(v) = mean_i 1/(2 - 2 cos(v, w_i)) >= 1/2 + mean_i cos(v, w_i)/2 (tangent at 0 of a convex
    function), so a zero-mean configuration holds every pole at E >= 1/2, with equality at a pole
    orthogonal to it: the simplex and two tight antipodal clusters score the same."""
    simplex, clusters = simplex_bound(n=10, d=128)
    assert math.isclose(simplex, 0.5, abs_tol=1e-6) and math.isclose(clusters, 0.5, abs_tol=1e-6)
    clustered = torch.zeros(10, 128, dtype=torch.float64)
    clustered[:5, 0], clustered[5:, 0] = 1.0, -1.0
    clustered[:5, 1:6] = 0.01 * torch.eye(5)
    clustered[5:, 1:6] = -0.01 * torch.eye(5)
    assert min_angle_degrees(clustered.float()) < 1.0
    unit = torch.nn.functional.normalize(clustered, dim=1)
    poles = torch.nn.functional.normalize(torch.randn(2000, 128, dtype=torch.float64), dim=1)
    energy = (1.0 / (2.0 - 2.0 * poles @ unit.T)).mean(1)
    assert float(energy.min()) >= 0.5 - 1e-12
