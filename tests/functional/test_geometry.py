"""Geometry oracles: the regular simplex is a minimum of every energy, plain projected gradient
descent reaches the published Thomson energies, and MHS reaches the Tammes optimum for N = 12.

Published values (REFERENCE.md): Thomson (s = 1 on S^2, sum_{i<j} 1/r_ij) N=4: 3.674234614,
N=12: 49.165253058 (icosahedron); Tammes N=12: best minimum angle 63.4349 degrees.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch

import lightning_hsu.functional as F

THOMSON = {4: 3.674234614, 12: 49.165253058}
TAMMES_12_DEGREES = 63.4349

SIMPLEX_PENALTIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mhe-s0": lambda w: F.hyperspherical_energy(w, power=0.0),
    "mhe-s1": lambda w: F.hyperspherical_energy(w, power=1.0),
    "mhe-s2": lambda w: F.hyperspherical_energy(w, power=2.0),
    "mhe-s1.5": lambda w: F.hyperspherical_energy(w, power=1.5),
    "mhe-a0": lambda w: F.hyperspherical_energy(w, power=0.0, distance="angular"),
    "mhe-a1": lambda w: F.hyperspherical_energy(w, power=1.0, distance="angular"),
    "mhe-a2": lambda w: F.hyperspherical_energy(w, power=2.0, distance="angular"),
    "mhs-hard": lambda w: F.hyperspherical_separation(w),
    "mhs-soft": lambda w: F.soft_hyperspherical_separation(w, temperature=0.1),
    "mgd": lambda w: F.gram_determinant_penalty(w),
    "uniformity": lambda w: F.uniformity(w, t=2.0),
}


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def regular_simplex(n: int, d: int, seed: int) -> torch.Tensor:
    """n unit vectors in R^d (n <= d + 1) with all pairwise cosines -1/(n-1), randomly rotated."""
    assert n <= d + 1
    centred = torch.eye(n, dtype=torch.float64) - 1.0 / n  # rows sum to zero: an (n-1)-dim simplex
    _, _, vh = torch.linalg.svd(centred)
    coords = centred @ vh[: n - 1].T  # [n, n-1], isometric coordinates in the hyperplane
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, n - 1, generator=g, dtype=torch.float64))  # [d, n-1] orthonormal
    return unit_rows(coords @ basis.T)


def min_angle_degrees(x: torch.Tensor) -> float:
    c = unit_rows(x) @ unit_rows(x).T
    c.fill_diagonal_(-1.0)
    return math.degrees(math.acos(float(c.max().clamp(-1.0, 1.0))))


@pytest.mark.parametrize(("n", "d"), [(4, 3), (5, 8), (6, 5)])
def test_regular_simplex_construction_has_all_cosines_minus_one_over_n_minus_one(n: int, d: int) -> None:
    x = regular_simplex(n, d, seed=0)
    c = x @ x.T
    off = c[~torch.eye(n, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1.0 / (n - 1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(c), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n", "d"), [(4, 3), (5, 8), (6, 5)])
@pytest.mark.parametrize("name", sorted(SIMPLEX_PENALTIES))
def test_random_perturbations_on_sphere_of_regular_simplex_increase_penalty(name: str, n: int, d: int) -> None:
    fn = SIMPLEX_PENALTIES[name]
    x = regular_simplex(n, d, seed=n + d)
    at_simplex = fn(x)
    g = torch.Generator().manual_seed(17)
    for size in (1e-1, 1e-2):
        for _ in range(8):
            moved = unit_rows(x + size * torch.randn(x.shape, generator=g, dtype=torch.float64))
            assert fn(moved) > at_simplex, f"{name}: a perturbation of size {size} lowered the penalty"


@pytest.mark.parametrize(("n", "d"), [(4, 3), (5, 8), (6, 5)])
@pytest.mark.parametrize("name", sorted(SIMPLEX_PENALTIES))
def test_gradient_at_regular_simplex_has_no_tangent_component(name: str, n: int, d: int) -> None:
    # Stationary on the sphere. For hard MHS this holds only because all tied pairs are summed.
    fn = SIMPLEX_PENALTIES[name]
    x = regular_simplex(n, d, seed=2 * n + d).requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x), x)
    u = x.detach()
    tangent = grad - (grad * u).sum(-1, keepdim=True) * u
    assert float(tangent.norm()) < 1e-9 * (1.0 + float(grad.norm()))


def projected_gradient_descent(
    energy: Callable[[torch.Tensor, int], torch.Tensor],
    n: int,
    seed: int,
    steps: int,
    lr: Callable[[int], float],
    record_every: int = 0,
) -> tuple[torch.Tensor, list[float]]:
    """x <- normalise(x - lr * grad) from random points on S^2; optionally records min angles."""
    x = unit_rows(torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    history = [min_angle_degrees(x)]
    for step in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(x, step), x)
        with torch.no_grad():
            x = unit_rows(x - lr(step) * grad)
        if record_every and (step + 1) % record_every == 0:
            history.append(min_angle_degrees(x))
    return x.detach(), history


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n", [4, 12])
def test_gradient_descent_on_riesz_1_energy_reaches_published_thomson_minimum(n: int, seed: int) -> None:
    pairs = n * (n - 1) / 2
    # The library returns the MEAN over pairs: the sum is pairs * mean.
    x, _ = projected_gradient_descent(
        lambda w, _: pairs * F.hyperspherical_energy(w, power=1.0), n, seed, steps=1500, lr=lambda _: 1.0 / n
    )
    thomson_sum = float((1.0 / torch.pdist(x)).sum())  # independent: sum_{i<j} 1/r_ij on unit vectors
    assert thomson_sum == pytest.approx(THOMSON[n], abs=1e-7)
    # The official eps makes the library see c / (1 + 1e-4) for unit rows, i.e. d^2 = 2 - 2c/(1 + 1e-4):
    # a slightly different (still completely monotone) kernel, with the same optimal configuration.
    c = (x @ x.T)[tuple(torch.triu_indices(n, n, 1))]
    reported = pairs * float(F.hyperspherical_energy(x, power=1.0))
    assert reported == pytest.approx(float((2.0 - 2.0 * c / (1.0 + 1e-4)).rsqrt().sum()), rel=1e-10)
    assert reported == pytest.approx(THOMSON[n], rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_mhs_with_annealed_temperature_reaches_tammes_12_icosahedron(seed: int) -> None:
    # Hard MHS alone moves only the closest pair(s) and needs thousands of steps here, so the
    # Tammes optimum is reached with the smooth MHS, annealing tau 1 -> 1e-3 (lr 0.5 -> 0.005).
    # (30 of 30 seeds tried reach 63.4349 deg to 1e-3 with this schedule.)
    steps = 1000

    def anneal(start: float, end: float, step: int) -> float:
        return start * (end / start) ** (step / (steps - 1))

    x, _ = projected_gradient_descent(
        lambda w, k: F.soft_hyperspherical_separation(w, temperature=anneal(1.0, 1e-3, k)),
        12,
        seed,
        steps=steps,
        lr=lambda k: anneal(0.5, 0.005, k),
    )
    assert min_angle_degrees(x) == pytest.approx(TAMMES_12_DEGREES, abs=1e-3)
    # The icosahedron: 30 pairs at the minimum angle, each point with 5 nearest neighbours.
    angles = torch.rad2deg(torch.arccos((x @ x.T).clamp(-1.0, 1.0)))
    near = (angles - TAMMES_12_DEGREES).abs() < 1e-2
    assert int(near.triu(1).sum()) == 30
    assert near.sum(1).tolist() == [5] * 12


def test_hard_mhs_subgradient_descent_improves_min_angle_steadily() -> None:
    final, history = projected_gradient_descent(
        lambda w, _: F.hyperspherical_separation(w),
        12,
        seed=1,
        steps=150,
        lr=lambda k: 0.05 / (1.0 + k / 50.0),
        record_every=50,
    )
    assert len(history) == 4
    assert history[-1] > history[0] + 25.0 and history[-1] > 45.0
    for before, after in itertools.pairwise(history):
        assert after > before - 1.0  # monotone up to the jitter of a subgradient method
    assert min_angle_degrees(final) == pytest.approx(history[-1])


def test_hard_mhs_icosahedron_is_stationary_and_a_local_max_of_min_distance() -> None:
    phi = (1.0 + math.sqrt(5.0)) / 2.0
    pts = [p for a in (-1.0, 1.0) for b in (-phi, phi) for p in ([0.0, a, b], [a, b, 0.0], [b, 0.0, a])]
    x = unit_rows(torch.tensor(pts, dtype=torch.float64))
    assert min_angle_degrees(x) == pytest.approx(TAMMES_12_DEGREES, abs=1e-4)
    x.requires_grad_(True)
    value = F.hyperspherical_separation(x)
    (grad,) = torch.autograd.grad(value, x)
    u = x.detach()
    tangent = grad - (grad * u).sum(-1, keepdim=True) * u
    assert float(tangent.norm()) < 1e-9 * float(grad.norm())
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        moved = unit_rows(u + 1e-3 * torch.randn(u.shape, generator=g, dtype=torch.float64))
        assert min_angle_degrees(moved) < TAMMES_12_DEGREES
