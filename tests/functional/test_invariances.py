"""Invariances every hyperspherical penalty must have: it depends on the set of neuron
*directions* only (permutation, positive rescaling of one neuron) and on their relative geometry
only (a common orthogonal transformation of all neurons, applied to a pole or a projection too).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import lightning_hsu.functional as F

D = 5
Penalty = Callable[..., torch.Tensor]

POLE = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
PROJ = torch.randn(3, 3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _rot(x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    return x if q is None else x @ q


# Each case: (penalty(w, eps, q) where q rotates any auxiliary vectors, rescale-invariant?)
CASES: dict[str, tuple[Penalty, bool]] = {}
for _half in (False, True):
    _sp = "half" if _half else "full"
    for _power, _dist in ((0.0, "euclidean"), (1.0, "euclidean"), (2.0, "euclidean"), (1.5, "euclidean"),
                          (0.0, "angular"), (2.0, "angular")):  # fmt: skip
        CASES[f"mhe-{_dist}-{_power}-{_sp}"] = (
            lambda w, eps, q, p=_power, d=_dist, h=_half: F.hyperspherical_energy(
                w, power=p, distance=d, half_space=h, eps=eps
            ),
            True,
        )
    CASES[f"mhs-hard-{_sp}"] = (lambda w, eps, q, h=_half: F.hyperspherical_separation(w, half_space=h, eps=eps), True)
    CASES[f"mhs-soft-{_sp}"] = (
        lambda w, eps, q, h=_half: F.soft_hyperspherical_separation(w, temperature=0.2, half_space=h, eps=eps),
        True,
    )
    CASES[f"mgd-{_sp}"] = (lambda w, eps, q, h=_half: F.gram_determinant_penalty(w, half_space=h, eps=eps), True)
    CASES[f"uniformity-{_sp}"] = (lambda w, eps, q, h=_half: F.uniformity(w, t=2.0, half_space=h, eps=eps), True)
    CASES[f"mhp-{_sp}"] = (lambda w, eps, q, h=_half: F.pole_energy(w, _rot(POLE, q), half_space=h, eps=eps), True)
    CASES[f"mhc-{_sp}"] = (
        lambda w, eps, q, h=_half: F.pole_covering_distance(w, _rot(POLE, q), half_space=h, eps=eps),
        True,
    )
    CASES[f"comhe-{_sp}"] = (
        lambda w, eps, q, h=_half: F.compressive_energy(w, _rot(PROJ, q), half_space=h, eps=eps),
        True,
    )
CASES["rmhp"] = (lambda w, eps, q: F.relaxed_polarization(w), False)

ALL = sorted(CASES)
SCALE_INVARIANT = sorted(k for k, (_, inv) in CASES.items() if inv)


def neurons(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Neurons with norms between 1 and 10 (where the official eps = 1e-4 is nearly negligible)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, D, generator=g, dtype=torch.float64)
    norms = torch.linspace(1.0, 10.0, n, dtype=torch.float64).unsqueeze(1)
    return w / w.norm(dim=1, keepdim=True) * norms


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed, reflections included


@pytest.mark.parametrize("name", ALL)
def test_permuting_neurons_leaves_penalty_unchanged(name: str) -> None:
    fn, _ = CASES[name]
    w = neurons()
    perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(3))
    assert not torch.equal(perm, torch.arange(w.shape[0]))
    torch.testing.assert_close(fn(w[perm], 1e-4, None), fn(w, 1e-4, None), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_common_orthogonal_rotation_of_all_neurons_leaves_penalty_unchanged(name: str) -> None:
    fn, _ = CASES[name]
    w = neurons(seed=4)
    q = random_orthogonal(D, seed=5)
    torch.testing.assert_close(fn(w @ q, 1e-4, q), fn(w, 1e-4, None), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", SCALE_INVARIANT)
def test_positive_rescaling_of_one_neuron_is_exact_invariance_with_tiny_eps(name: str) -> None:
    fn, _ = CASES[name]
    w = neurons(seed=6)
    reference = fn(w, 1e-14, None)
    for factor in (0.25, 3.0, 40.0):
        scaled = w.clone()
        scaled[2] *= factor
        torch.testing.assert_close(
            fn(scaled, 1e-14, None), reference, rtol=1e-9, atol=1e-9, msg=lambda m, f=factor: f"factor {f}: {m}"
        )


@pytest.mark.parametrize("name", SCALE_INVARIANT)
def test_positive_rescaling_of_one_neuron_is_approximate_invariance_with_official_eps(name: str) -> None:
    # w / sqrt(||w||^2 + 1e-4) is a direction only up to a relative 1e-4 / ||w||^2 <= 1e-4 here.
    fn, _ = CASES[name]
    w = neurons(seed=7)
    scaled = w.clone()
    scaled[0] *= 5.0  # norm 1 -> 5
    torch.testing.assert_close(fn(scaled, 1e-4, None), fn(w, 1e-4, None), rtol=2e-3, atol=2e-3)


def test_rmhp_is_not_rescale_invariant_because_it_uses_raw_weights() -> None:
    w = neurons(seed=8)
    scaled = w.clone()
    scaled[0] *= 5.0
    assert not torch.allclose(F.relaxed_polarization(scaled), F.relaxed_polarization(w))
