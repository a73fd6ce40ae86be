"""Sampled diversity profiles of huge layers (`max_neurons`), against plain-torch computations.

Every expected value here is computed independently of the library: angles by the textbook
formula (`geometry.dense_angles`), the energy and uniformity over the explicit pairs (in half space
over the concatenation of the neurons and their negations, as the official code does), the spectrum
from `torch.linalg.svdvals`.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_hsu.functional.diversity import diversity_profile, sample_neuron_indices

from .geometry import dense_angles

EPS = 1e-4  # the official normaliser of the energy and the uniformity


def clustered(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Neurons whose pair values vary: a fifth of them in a loose cluster."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[: n // 5] += 1.5
    return w


def pair_values(w: torch.Tensor, half_space: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared chordal distances of every pair of the normalised neurons (of ±w in half space),
    and the pairwise angles in degrees (between lines in half space)."""
    u = w / torch.sqrt((w * w).sum(1, keepdim=True) + EPS)
    points = torch.cat([u, -u]) if half_space else u
    i, j = torch.triu_indices(len(points), len(points), 1)
    d2 = ((points[i] - points[j]) ** 2).sum(1)
    return d2, dense_angles(w, half_space=half_space)


def exact_means(w: torch.Tensor, half_space: bool, t: float = 2.0) -> dict[str, float]:
    d2, angles = pair_values(w, half_space)
    return {
        "mean_angle": float(angles.mean()),
        "energy": float((1.0 / d2.clamp_min(1e-6)).mean()),  # Riesz s = 2 (the default power)
        "uniformity_kernel": float(torch.exp(-t * d2).mean()),  # what exp(uniformity) estimates
    }


def test_layer_within_max_neurons_is_profiled_exactly() -> None:
    w = clustered(40, 5)
    sampled = diversity_profile(w, max_neurons=40)
    assert not sampled.sampled and sampled.neurons == sampled.neurons_used == 40
    assert sampled.metrics == diversity_profile(w).metrics


def test_indices_are_a_seeded_uniform_subset() -> None:
    idx = sample_neuron_indices(50, 12, seed=3)
    assert idx.dtype == torch.int64 and len(idx) == 12 == len(set(idx.tolist()))
    assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < 50
    assert torch.equal(idx, sample_neuron_indices(50, 12, seed=3))
    assert not torch.equal(idx, sample_neuron_indices(50, 12, seed=4))
    # Each of n = 10 neurons is drawn with probability m/n = 0.3: frequencies over 400 seeds within
    # 4 binomial standard deviations.
    counts = torch.zeros(10)
    for seed in range(400):
        counts[sample_neuron_indices(10, 3, seed)] += 1
    assert (counts / 400 - 0.3).abs().max() < 4 * math.sqrt(0.3 * 0.7 / 400)


@pytest.mark.parametrize("half_space", [False, True])
def test_sampled_metrics_are_those_of_the_drawn_neurons(half_space: bool) -> None:
    w = clustered(300, 4)
    profile = diversity_profile(w, max_neurons=60, seed=7, half_space=half_space, bins=9)
    assert profile.sampled and (profile.neurons, profile.neurons_used) == (300, 60)
    angles = dense_angles(w[sample_neuron_indices(300, 60, seed=7)], half_space=half_space)
    assert profile.pairs == 60 * 59 // 2 == len(angles) == int(profile.histogram.sum())
    assert profile.metrics["min_angle"] == pytest.approx(float(angles.min()), abs=1e-3)
    assert profile.metrics["mean_angle"] == pytest.approx(float(angles.mean()), abs=1e-3)


@pytest.mark.parametrize("half_space", [False, True])
def test_means_are_unbiased_estimates_of_the_whole_layer(half_space: bool) -> None:
    """Averaged over 80 seeds, the subset estimates of the mean angle, the energy and the uniformity's
    kernel mean agree with the whole layer's within 4 standard errors of that average; a single
    draw of m = 150 is within 4 times Hoeffding's bound sigma * sqrt(2/m) of the mean angle."""
    w = clustered(400, 5)
    exact = exact_means(w, half_space)
    names = ["mean_angle", "energy", "uniformity"]
    draws = [diversity_profile(w, metrics=names, max_neurons=40, seed=s, half_space=half_space) for s in range(80)]
    assert all(p.sampled for p in draws)
    estimates = {
        "mean_angle": torch.tensor([p.metrics["mean_angle"] for p in draws]),
        "energy": torch.tensor([p.metrics["energy"] for p in draws]),
        "uniformity_kernel": torch.tensor([math.exp(p.metrics["uniformity"]) for p in draws]),
    }
    for name, values in estimates.items():
        stderr = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - exact[name]) < 4 * stderr, name
    # Without the half-space reweighting the subset's antipodal pairs would weigh 1/(2m-1), not
    # 1/(2n-1): far outside this tolerance (tests/functional/test_sampling.py shows it for MHE).

    _, angles = pair_values(w, half_space)
    one = diversity_profile(w, metrics=["mean_angle"], max_neurons=150, seed=0, half_space=half_space)
    assert abs(one.metrics["mean_angle"] - exact["mean_angle"]) < 4 * float(angles.std()) * math.sqrt(2 / 150)


def test_planted_near_duplicate_is_seen_only_when_both_ends_are_drawn() -> None:
    """The sampled minimum angle is an upper bound of the layer's: it equals the planted 0.5° only
    for subsets holding both neurons of the pair (probability m(m-1)/(n(n-1)) = 6.2% here), and is
    otherwise the (larger) minimum of the drawn neurons. Coherence and duplicates are lower bounds."""
    n, m = 400, 100
    w = clustered(n, 8, seed=1)
    theta = math.radians(0.5)
    other = torch.randn(8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    u0 = w[0] / w[0].norm()
    v = other - (other @ u0) * u0
    w[1] = math.cos(theta) * u0 + math.sin(theta) * v / v.norm()
    full = dense_angles(w)
    assert float(full.min()) == pytest.approx(0.5, abs=1e-6)
    square = torch.full((n, n), math.inf, dtype=torch.float64)
    i, j = torch.triu_indices(n, n, 1)
    square[i, j] = full
    square[j, i] = full
    nearest = square.min(1).values  # every neuron's nearest-neighbour angle in the whole layer
    exact_coherence = math.cos(theta)
    names = ["min_angle", "coherence", "duplicates", "mean_nn_angle"]
    hits = 0
    for seed in range(120):
        p = diversity_profile(w, metrics=names, max_neurons=m, seed=seed)
        idx = sample_neuron_indices(n, m, seed)
        assert p.metrics["min_angle"] >= float(full.min()) - 1e-6
        assert p.metrics["coherence"] <= exact_coherence + 1e-6
        assert p.metrics["mean_nn_angle"] >= float(nearest[idx].mean()) - 1e-6  # an overestimate
        if {0, 1} <= set(idx.tolist()):
            hits += 1
            assert p.metrics["min_angle"] == pytest.approx(0.5, abs=1e-3)
            assert p.metrics["duplicates"] == 2
        else:
            assert p.metrics["min_angle"] == pytest.approx(float(dense_angles(w[idx]).min()), abs=1e-3)
            assert p.metrics["min_angle"] > 5.0 and p.metrics["duplicates"] == 0
    # 120 seeds, hit probability 0.062: 7.4 expected, binomial sd 2.6.
    assert 0 < hits < 18


def test_spectrum_stays_exact_when_sampled() -> None:
    w = clustered(600, 6)
    w[:, 0] *= 5.0  # a dominant direction, so the condition number is far from 1
    p = diversity_profile(w, metrics=["effective_rank", "condition_number"], max_neurons=50)
    assert p.sampled
    sq = torch.linalg.svdvals(w / w.norm(dim=1, keepdim=True)) ** 2  # eigenvalues of U^T U
    prob = sq / sq.sum()
    assert p.metrics["effective_rank"] == pytest.approx(float(torch.exp(-(prob * prob.log()).sum())), rel=1e-9)
    assert p.metrics["condition_number"] == pytest.approx(float(sq.max() / sq.min()), rel=1e-9)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def test_sampled_profile_allocates_no_n_by_n_matrix() -> None:
    n, d, m = 20_000, 3, 64
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    with LargestTensor() as mode:
        p = diversity_profile(w, max_neurons=m, half_space=True)
    assert p.sampled
    # The largest tensors: [n, d] copies of the weight (the exact spectrum's directions), the
    # subset's m x m cosines, the 256 x 256 strip mask and the 18,000-bin fine histogram; the dense
    # Gram matrix would have n^2 = 4e8 elements.
    assert mode.largest <= max(n * d, m * m, 256 * 256, 18_000)


@pytest.mark.parametrize("bad", [1, 0, True, 2.5, "4096"])
def test_max_neurons_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="max_neurons"):
        diversity_profile(torch.randn(5, 3), max_neurons=bad)  # type: ignore[arg-type]
