"""Functional diversity metrics against configurations with known answers and a dense oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_hsu.functional import hyperspherical_energy, uniformity
from lightning_hsu.functional.diversity import (
    DIVERSITY_METRICS,
    angle_statistics,
    coherence,
    diversity_profile,
    diversity_summary,
    effective_rank,
    gram_condition_number,
    mean_nearest_angle,
    mean_pairwise_angle,
    minimum_angle,
    near_duplicate_count,
    pairwise_angle_histogram,
    pairwise_angle_quantiles,
)

from .geometry import cross_polytope, dense_angles, icosahedron, regular_simplex

TOL = 1e-3  # degrees, for float32 computation of angles


@pytest.mark.parametrize(("n", "d"), [(3, 3), (5, 5), (8, 12)])
def test_regular_simplex_all_angles_equal(n: int, d: int) -> None:
    x = regular_simplex(n, d).float()
    expected = math.degrees(math.acos(-1.0 / (n - 1)))
    assert minimum_angle(x).item() == pytest.approx(expected, abs=TOL)
    assert mean_nearest_angle(x).item() == pytest.approx(expected, abs=TOL)
    assert mean_pairwise_angle(x).item() == pytest.approx(expected, abs=TOL)
    assert coherence(x).item() == pytest.approx(1.0 / (n - 1), abs=1e-6)
    assert pairwise_angle_quantiles(x, [0.05, 0.5, 0.95]).tolist() == pytest.approx([expected] * 3, abs=TOL)
    # The Gram matrix (1 + 1/(n-1)) I - 11^T/(n-1) has eigenvalue n/(n-1) (n-1 times) and 0.
    assert effective_rank(x).item() == pytest.approx(n - 1, rel=1e-6)
    assert math.isinf(gram_condition_number(x).item())
    # Half-space: the angle between lines is 180° − θ, as θ > 90°.
    assert minimum_angle(x, half_space=True).item() == pytest.approx(180.0 - expected, abs=TOL)


def test_cross_polytope() -> None:
    d = 4
    x = cross_polytope(d).float()
    assert minimum_angle(x).item() == pytest.approx(90.0, abs=TOL)
    assert mean_nearest_angle(x).item() == pytest.approx(90.0, abs=TOL)
    # Each vector: 2d-2 neighbours at 90°, one at 180° → mean over pairs (d(2d-2)·90 + d·180)/(d(2d-1)).
    expected_mean = ((2 * d - 2) * 90.0 + 180.0) / (2 * d - 1)
    assert mean_pairwise_angle(x).item() == pytest.approx(expected_mean, abs=TOL)
    assert coherence(x).item() == pytest.approx(1.0)  # ± pairs
    assert near_duplicate_count(x).item() == 0
    # Half-space: ±e_k span the same line: every neuron has a duplicate, and the minimum is 0.
    assert minimum_angle(x, half_space=True).item() == pytest.approx(0.0, abs=TOL)
    assert near_duplicate_count(x, half_space=True).item() == 2 * d
    # A tight frame: U^T U = 2 I.
    assert effective_rank(x).item() == pytest.approx(d, rel=1e-6)
    assert gram_condition_number(x).item() == pytest.approx(1.0, rel=1e-6)


def test_icosahedron_tammes_angle() -> None:
    x = icosahedron().float()
    tammes = 63.4349  # best minimum angle of 12 points on S^2
    assert minimum_angle(x).item() == pytest.approx(tammes, abs=TOL)
    assert mean_nearest_angle(x).item() == pytest.approx(tammes, abs=TOL)
    # Each vertex: 5 neighbours at θ, 5 at 180° − θ, 1 antipode at 180°: mean (5·180 + 180)/11.
    assert mean_pairwise_angle(x).item() == pytest.approx(1080.0 / 11.0, abs=TOL)
    assert coherence(x).item() == pytest.approx(1.0)
    assert minimum_angle(x, half_space=True).item() == pytest.approx(0.0, abs=TOL)
    counts, edges = pairwise_angle_histogram(x, bins=[0, 60, 70, 110, 120, 179, 180])
    assert counts.tolist() == [0, 30, 0, 30, 0, 6]  # 66 pairs: 30 edges, 30 at 116.57°, 6 antipodal
    assert torch.equal(edges, torch.tensor([0, 60, 70, 110, 120, 179, 180], dtype=edges.dtype))


def test_duplicates_counted() -> None:
    base = regular_simplex(6).float()
    noise = 1e-4 * torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    x = torch.cat([base, 3.0 * base[:2] + noise])  # two near copies, at another scale
    assert near_duplicate_count(x, threshold=1.0).item() == 4  # each copy and its original
    assert minimum_angle(x).item() < 0.1
    assert near_duplicate_count(x, threshold=0.0).item() == 0
    negated = torch.cat([base, -base[:1]])
    assert near_duplicate_count(negated).item() == 0
    assert near_duplicate_count(negated, half_space=True).item() == 2


@pytest.mark.parametrize("half_space", [False, True])
def test_against_dense_oracle_and_chunked(half_space: bool) -> None:
    x = torch.randn(61, 7, generator=torch.Generator().manual_seed(1))
    angles = dense_angles(x, half_space)
    u = x.double() / x.double().norm(dim=1, keepdim=True)
    c = u @ u.T
    c.fill_diagonal_(0)
    full = dense_angles(x, half_space).new_zeros(61, 61)
    i, j = torch.triu_indices(61, 61, 1)
    full[i, j] = angles
    full[j, i] = angles
    full.fill_diagonal_(math.inf)
    nearest = full.min(dim=1).values
    dense = diversity_summary(x, half_space=half_space)
    assert dense["min_angle"] == pytest.approx(float(angles.min()), abs=TOL)
    assert dense["mean_nn_angle"] == pytest.approx(float(nearest.mean()), abs=TOL)
    assert dense["mean_angle"] == pytest.approx(float(angles.mean()), abs=TOL)
    assert dense["coherence"] == pytest.approx(float(c.abs().max()), abs=1e-6)
    assert dense["duplicates"] == float((nearest < 1.0).sum())
    q = np.quantile(angles.numpy(), [0.05, 0.5, 0.95])
    assert [dense["angle_p5"], dense["angle_p50"], dense["angle_p95"]] == pytest.approx(q.tolist(), abs=0.011)
    top = 90 if half_space else 180
    counts, _ = pairwise_angle_histogram(x, bins=12, half_space=half_space)
    np_counts, _ = np.histogram(angles.numpy(), bins=12, range=(0, top))
    assert counts.tolist() == np_counts.tolist()
    # Blocks of 5 rows (13 blocks, the last partial) give the same numbers.
    chunked = diversity_summary(x, half_space=half_space, chunk_size=5)
    assert chunked.keys() == dense.keys()
    for key in dense:
        assert chunked[key] == pytest.approx(dense[key], rel=1e-5, abs=1e-5), key
    assert torch.equal(pairwise_angle_histogram(x, bins=12, half_space=half_space, chunk_size=5)[0], counts)


def test_spectrum_against_numpy() -> None:
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(2)) * torch.arange(1, 10).unsqueeze(1)
    u = (x / x.norm(dim=1, keepdim=True)).double().numpy()
    sv = np.linalg.svd(u, compute_uv=False)
    lam = sv**2
    p = lam / lam.sum()
    assert effective_rank(x).item() == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert gram_condition_number(x).item() == pytest.approx(lam.max() / lam.min(), rel=1e-5)
    orthonormal, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)))
    assert effective_rank(orthonormal[:4]).item() == pytest.approx(4.0, rel=1e-5)
    assert gram_condition_number(orthonormal[:4]).item() == pytest.approx(1.0, rel=1e-4)


def test_energy_and_uniformity_are_the_core_functions() -> None:
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(4))
    for half_space in (False, True):
        s = diversity_summary(x, half_space=half_space, power=1.0, t=3.0)
        assert s["energy"] == pytest.approx(float(hyperspherical_energy(x, power=1.0, half_space=half_space)))
        assert s["uniformity"] == pytest.approx(float(uniformity(x, t=3.0, half_space=half_space)))


def test_summary_keys_metric_subset_and_no_grad() -> None:
    x = torch.randn(10, 4, requires_grad=True)
    s = diversity_summary(x)
    assert set(s) == set(DIVERSITY_METRICS) | {"angle_p5", "angle_p50", "angle_p95"}
    assert all(isinstance(v, float) for v in s.values())
    assert set(diversity_summary(x, metrics=["min_angle"], quantiles=())) == {"min_angle"}
    assert not minimum_angle(x).requires_grad
    with pytest.raises(ValueError, match="unknown diversity metric"):
        diversity_summary(x, metrics=["min_angel"])


def test_low_precision_input_is_computed_in_float32() -> None:
    x = icosahedron().to(torch.bfloat16)
    # bf16 rounding moves the vertices; the angle is computed from those rounded vectors in fp32.
    assert minimum_angle(x).dtype == torch.float32
    assert minimum_angle(x).item() == pytest.approx(float(dense_angles(x.float()).min()), abs=TOL)


def test_degenerate_inputs() -> None:
    one = torch.randn(1, 3)
    assert math.isnan(minimum_angle(one).item())
    assert near_duplicate_count(one).item() == 0
    assert pairwise_angle_histogram(one, bins=4)[0].sum().item() == 0
    zero_row = torch.cat([torch.eye(3), torch.zeros(1, 3)])
    assert minimum_angle(zero_row).item() == pytest.approx(90.0, abs=TOL)  # a zero neuron: cosine 0
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        minimum_angle(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        minimum_angle(torch.tensor([[1.0, math.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_count(torch.eye(3), threshold=-1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        pairwise_angle_histogram(torch.eye(3), bins=[10.0, 5.0])


def test_profile_histogram_totals() -> None:
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(5))
    profile = diversity_profile(x, bins=7)
    stats = angle_statistics(x, bins=7)
    assert int(profile.histogram.sum()) == profile.pairs == 30 * 29 // 2
    assert profile.angle_sum == pytest.approx(float(dense_angles(x).sum()), rel=1e-5)
    assert profile.angle_sq_sum == pytest.approx(float((dense_angles(x) ** 2).sum()), rel=1e-5)
    assert stats.max_angle == pytest.approx(float(dense_angles(x).max()), abs=0.011)
