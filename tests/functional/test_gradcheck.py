"""``torch.autograd.gradcheck`` (float64, finite differences) for every regulariser.

The pairwise energies use a custom autograd Function whose gradient is written in closed form
block by block: gradcheck is the independent check that it is the derivative of the value.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import lightning_hsu.functional as F
from lightning_hsu.regularizers import MGD, MHC, MHE, MHP, MHS, RMHP, CoMHE, Uniformity


def weights(n: int = 6, d: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (w * torch.linspace(0.5, 2.0, n, dtype=torch.float64).unsqueeze(1)).requires_grad_(True)


def pole(d: int = 4, seed: int = 100) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


SPACES = [pytest.param(False, id="full"), pytest.param(True, id="half")]
ENERGY_VARIANTS = [
    pytest.param(0.0, "euclidean", id="s0"),
    pytest.param(1.0, "euclidean", id="s1"),
    pytest.param(2.0, "euclidean", id="s2"),
    pytest.param(1.5, "euclidean", id="s1.5"),
    pytest.param(0.0, "angular", id="a0"),
    pytest.param(1.0, "angular", id="a1"),
    pytest.param(2.0, "angular", id="a2"),
]


@pytest.mark.parametrize("half_space", SPACES)
@pytest.mark.parametrize(("power", "distance"), ENERGY_VARIANTS)
def test_gradcheck_mhe_closed_form_gradient(power: float, distance: str, half_space: bool) -> None:
    fn = lambda w: F.hyperspherical_energy(w, power=power, distance=distance, half_space=half_space)  # noqa: E731
    assert gradcheck(fn, (weights(),))


@pytest.mark.parametrize("half_space", SPACES)
def test_gradcheck_mhe_chunked_path_and_batched_input(half_space: bool) -> None:
    chunked = lambda w: F.hyperspherical_energy(w, power=1.0, half_space=half_space, chunk_size=2)  # noqa: E731
    assert gradcheck(chunked, (weights(n=7),))
    batched = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fn = lambda w: F.hyperspherical_energy(w, power=2.0, half_space=half_space)  # noqa: E731
    assert gradcheck(fn, (batched.requires_grad_(True),))


@pytest.mark.parametrize("half_space", SPACES)
def test_gradcheck_hard_mhs_through_closest_pairs(half_space: bool) -> None:
    fn = lambda w: F.hyperspherical_separation(w, half_space=half_space)  # noqa: E731
    assert gradcheck(fn, (weights(n=7, d=3, seed=1),))


@pytest.mark.parametrize("temperature", [0.05, 1.0])
@pytest.mark.parametrize("half_space", SPACES)
def test_gradcheck_soft_mhs(temperature: float, half_space: bool) -> None:
    fn = lambda w: F.soft_hyperspherical_separation(w, temperature=temperature, half_space=half_space)  # noqa: E731
    assert gradcheck(fn, (weights(seed=2),))


@pytest.mark.parametrize("half_space", SPACES)
def test_gradcheck_mgd_minus_logdet(half_space: bool) -> None:
    fn = lambda w: F.gram_determinant_penalty(w, half_space=half_space)  # noqa: E731
    assert gradcheck(fn, (weights(seed=3),))


@pytest.mark.parametrize("half_space", SPACES)
def test_gradcheck_mhp_pole_energy_wrt_neurons_and_pole(half_space: bool) -> None:
    fn = lambda w, v: F.pole_energy(w, v, half_space=half_space)  # noqa: E731
    assert gradcheck(fn, (weights(seed=4), pole().requires_grad_(True)))


@pytest.mark.parametrize("half_space", SPACES)
def test_gradcheck_mhc_covering_distance_wrt_neurons_and_pole(half_space: bool) -> None:
    fn = lambda w, v: F.pole_covering_distance(w, v, gamma=10.0, half_space=half_space)  # noqa: E731
    assert gradcheck(fn, (weights(seed=5), pole().requires_grad_(True)))


def test_gradcheck_rmhp_norm_of_sum() -> None:
    assert gradcheck(F.relaxed_polarization, (weights(seed=6),))


@pytest.mark.parametrize("half_space", SPACES)
def test_gradcheck_comhe_with_fixed_projections(half_space: bool) -> None:
    proj = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fn = lambda w: F.compressive_energy(w, proj, power=2.0, half_space=half_space)  # noqa: E731
    assert gradcheck(fn, (weights(n=6, d=5, seed=7),))


@pytest.mark.parametrize("half_space", SPACES)
def test_gradcheck_comhe_with_learned_projections(half_space: bool) -> None:
    # the angle-preserving and adversarial CoMHE variants differentiate through the projections
    proj = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    fn = lambda w, p: F.compressive_energy(w, p, power=2.0, half_space=half_space)  # noqa: E731
    assert gradcheck(fn, (weights(n=6, d=5, seed=8), proj.requires_grad_(True)))


@pytest.mark.parametrize("t", [0.5, 2.0, 20.0])
@pytest.mark.parametrize("half_space", SPACES)
def test_gradcheck_uniformity_log_sum_exp(t: float, half_space: bool) -> None:
    fn = lambda w: F.uniformity(w, t=t, half_space=half_space)  # noqa: E731
    assert gradcheck(fn, (weights(seed=8),))


@pytest.mark.parametrize(
    "reg",
    [
        pytest.param(MHE(power=2.0, half_space=True), id="MHE-half"),
        pytest.param(MHE(power=0.0, distance="angular"), id="MHE-a0"),
        pytest.param(MHS(), id="MHS-hard"),
        pytest.param(MHS(half_space=True, temperature=0.1), id="MHS-soft-half"),
        pytest.param(MGD(half_space=True), id="MGD-half"),
        pytest.param(RMHP(), id="RMHP"),
        pytest.param(Uniformity(t=2.0), id="Uniformity"),
        pytest.param(CoMHE(projection_dim=2, projections=3, resample=False), id="CoMHE-fixed"),
        pytest.param(CoMHE(projection_dim=2, projections=3, resample=True, half_space=True), id="CoMHE-step"),
    ],
)
def test_gradcheck_deterministic_regularizer_objects(reg) -> None:
    # CoMHE with resample=True draws from (seed, layer, step): fixed step = deterministic.
    assert gradcheck(lambda w: reg(w, step=3), (weights(n=6, d=5, seed=9),))


@pytest.mark.parametrize("cls", [MHP, MHC])
@pytest.mark.parametrize("half_space", SPACES)
def test_gradcheck_pole_regularizer_neuron_penalty_with_fixed_pole(cls, half_space: bool) -> None:
    reg = cls(half_space=half_space)
    v = pole(d=5, seed=10)
    assert gradcheck(lambda w: reg.neuron_penalty(w, v), (weights(n=6, d=5, seed=10),))


@pytest.mark.parametrize("cls", [MHP, MHC])
def test_gradcheck_pole_regularizer_penalty_within_one_step_keeps_pole_fixed(cls) -> None:
    reg = cls(inner_steps=2)
    w = weights(n=6, d=5, seed=11)
    reg(w, step=0)  # the pole moves once for step 0 ...
    before = reg.pole.detach().clone()
    assert gradcheck(lambda x: reg(x, step=0), (w,))  # ... and not again within step 0
    torch.testing.assert_close(reg.pole.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [MHP, MHC])
@pytest.mark.parametrize("half_space", SPACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pole_steps_in_closed_form_follow_autograd_of_the_pole_objective(cls, half_space: bool, dtype) -> None:
    """The pole's inner steps form their gradient in closed form; the reference differentiates
    ``pole_objective`` with autograd and steps an identical SGD (momentum, weight decay)."""
    w = weights(n=12, d=5, seed=12).detach().to(dtype)
    ours, ref = cls(half_space=half_space).spawn("layer"), cls(half_space=half_space).spawn("layer")
    start = ours._ensure_pole(5, w.device).detach().clone()
    target = F.normalize_neurons(w, ours.eps)
    objective = []
    for _ in range(2):  # two training steps of 10 inner steps: the momentum carries over
        objective.append(float(ours.pole_objective(target, ours.pole.detach(), normalized=True)))
        ours.update_pole(w)
        pole = ref._ensure_pole(5, w.device)
        for _ in range(ref.inner_steps):
            ref._optimizer.zero_grad(set_to_none=True)
            ref.pole_objective(target, pole, normalized=True).backward()
            ref._optimizer.step()
        torch.testing.assert_close(ours.pole, ref.pole, rtol=1e-5, atol=1e-6)
    objective.append(float(ours.pole_objective(target, ours.pole.detach(), normalized=True)))
    assert not torch.equal(ours.pole.detach(), start)
    assert objective[-1] < objective[0]  # the pole descends its objective


def test_a_pole_game_without_a_closed_form_slope_steps_by_autograd() -> None:
    class AutogradMHP(MHP):  # a user's game: only its objective is defined
        def pole_slope(self, cos):  # type: ignore[no-untyped-def]
            return None

    w = weights(n=12, d=5, seed=13).detach()
    closed, by_autograd = MHP(half_space=True).spawn("layer"), AutogradMHP(half_space=True).spawn("layer")
    for _ in range(2):
        closed.update_pole(w)
        by_autograd.update_pole(w)
    torch.testing.assert_close(by_autograd.pole, closed.pole, rtol=1e-5, atol=1e-6)
