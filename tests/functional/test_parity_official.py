"""Parity of every regulariser with an independent statement of the official formulas.

The reference (:mod:`.official`) concatenates ``[W; -W]`` for half-space and builds the full
matrix, as the official TF code does; the library never does either. float64 throughout, so the
tolerances are tight.
"""

from __future__ import annotations

import math

import pytest
import torch

import lightning_hsu.functional as F
from lightning_hsu.regularizers import MGD, MHE, MHS, RMHP, CoMHE, Uniformity

from . import official

RTOL = 1e-10
ATOL = 1e-12

ENERGY_VARIANTS = [
    pytest.param(0.0, "euclidean", id="official-0-log"),
    pytest.param(1.0, "euclidean", id="official-1"),
    pytest.param(2.0, "euclidean", id="official-2"),
    pytest.param(1.5, "euclidean", id="riesz-1.5"),
    pytest.param(0.0, "angular", id="official-a0"),
    pytest.param(1.0, "angular", id="official-a1"),
    pytest.param(2.0, "angular", id="official-a2"),
]
SPACES = [pytest.param(False, id="full"), pytest.param(True, id="half")]


def fixed_weights(n: int = 9, d: int = 5, seed: int = 0) -> torch.Tensor:
    """Random neurons of norms between ~0.3 and ~5 (the normaliser's eps matters a little)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    scales = torch.linspace(0.3, 2.0, n, dtype=torch.float64).unsqueeze(1)
    return w * scales


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("half_space", SPACES)
@pytest.mark.parametrize(("power", "distance"), ENERGY_VARIANTS)
def test_mhe_equals_official_concatenated_formula(power: float, distance: str, half_space: bool) -> None:
    w = fixed_weights()
    got = F.hyperspherical_energy(w, power=power, distance=distance, half_space=half_space)
    assert_close(got, official.mhe(w, power, distance, half_space))


@pytest.mark.parametrize("half_space", SPACES)
@pytest.mark.parametrize(("power", "distance"), ENERGY_VARIANTS)
def test_mhe_regularizer_object_equals_official_formula(power: float, distance: str, half_space: bool) -> None:
    w = fixed_weights(n=7, d=4, seed=1)
    got = MHE(power=power, distance=distance, half_space=half_space)(w)
    assert_close(got, official.mhe(w, power, distance, half_space))


@pytest.mark.parametrize("half_space", SPACES)
def test_mhe_batched_input_equals_official_formula_per_batch_element(half_space: bool) -> None:
    w = torch.stack([fixed_weights(seed=s) for s in range(3)])
    got = F.hyperspherical_energy(w, power=2.0, half_space=half_space)
    expected = torch.stack([official.mhe(x, 2.0, "euclidean", half_space) for x in w])
    assert got.shape == (3,)
    assert_close(got, expected)


@pytest.mark.parametrize("power", [0.0, 2.0])
def test_angular_mhe_clamps_cosine_before_arccos_as_documented(power: float) -> None:
    # Large norms make the half-space antipodal pairs (i, -i) have c = -||w||^2/(||w||^2 + eps),
    # within 1e-6 of -1: the library clamps there (the official code does not).
    w = fixed_weights() * 300.0
    got = F.hyperspherical_energy(w, power=power, distance="angular", half_space=True)
    assert_close(got, official.mhe(w, power, "angular", True, cos_margin=1e-6))


@pytest.mark.parametrize("eps", [1e-2, 1e-8])
def test_mhe_normaliser_eps_is_the_official_sqrt_norm_squared_plus_eps(eps: float) -> None:
    w = fixed_weights() * 0.05  # small norms: eps changes the value visibly
    got = F.hyperspherical_energy(w, power=1.0, eps=eps)
    assert_close(got, official.mhe(w, 1.0, "euclidean", False, eps=eps))
    assert not torch.allclose(got, official.mhe(w, 1.0, "euclidean", False, eps=1e-4), rtol=1e-6)


@pytest.mark.parametrize("half_space", SPACES)
def test_hard_mhs_equals_official_min_over_upper_triangle(half_space: bool) -> None:
    w = fixed_weights(n=11, d=4, seed=2)
    got = F.hyperspherical_separation(w, half_space=half_space)
    assert_close(got, official.hard_mhs(w, half_space))
    assert_close(MHS(half_space=half_space)(w), official.hard_mhs(w, half_space))


def test_hard_mhs_gradient_flows_only_through_the_closest_pair() -> None:
    w = fixed_weights(n=8, d=4, seed=20).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.hyperspherical_separation(w), w)
    sq = 2.0 - 2.0 * official.cosine_matrix(w.detach(), half_space=False)
    sq.fill_diagonal_(torch.inf)
    closest = {int(k) for k in divmod(int(torch.argmin(sq)), 8)}
    for k in range(8):
        assert (grad[k].abs().sum() > 0) == (k in closest), f"neuron {k}"


def test_hard_mhs_half_space_counts_pair_and_its_negated_copy_twice() -> None:
    # In [W; -W] the entries (i, j) and (-i, -j) are the same distance: the official code sums both.
    w = fixed_weights(n=6, d=5, seed=3)
    full = F.hyperspherical_separation(w, half_space=False)
    sq = official.upper(2.0 - 2.0 * official.cosine_matrix(w, half_space=True))
    tied = torch.isclose(sq, sq.min(), rtol=1e-12, atol=0.0)
    assert int(tied.sum()) == 2
    expected = -sq[tied].sum()
    assert_close(F.hyperspherical_separation(w, half_space=True), expected)
    if torch.isclose(-full / 1.0, sq.min(), rtol=1e-12):  # closest pair not a negated one
        assert_close(F.hyperspherical_separation(w, half_space=True), 2.0 * full)


def regular_tetrahedron(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=dtype) / math.sqrt(3.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hard_mhs_regular_tetrahedron_sums_all_six_tied_pairs(dtype: torch.dtype) -> None:
    w = regular_tetrahedron(dtype)
    # Unit neurons normalised by sqrt(1 + 1e-4): c = -1/3 / (1 + 1e-4); about -6 * 8/3 = -16.
    c = -1.0 / 3.0 / (1.0 + 1e-4)
    expected = torch.tensor(-6.0 * (2.0 - 2.0 * c), dtype=torch.float64)
    got = F.hyperspherical_separation(w)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert_close(got, expected, rtol=tol, atol=0.0)
    assert_close(got, torch.tensor(-6.0 * 8.0 / 3.0, dtype=torch.float64), rtol=1e-4, atol=0.0)
    assert_close(F.hyperspherical_separation(w.to(torch.float64)), official.hard_mhs(w.to(torch.float64), False))


def test_hard_mhs_regular_tetrahedron_half_space_is_the_cube_with_twelve_tied_edges() -> None:
    # {±tetrahedron} is a cube: 12 edges of d^2 = 4/3 (up to eps), i.e. about -16 again.
    w = regular_tetrahedron()
    c = 1.0 / 3.0 / (1.0 + 1e-4)
    expected = torch.tensor(-12.0 * (2.0 - 2.0 * c), dtype=torch.float64)
    assert_close(F.hyperspherical_separation(w, half_space=True), expected, rtol=1e-12, atol=0.0)
    assert_close(F.hyperspherical_separation(w, half_space=True), official.hard_mhs(w, True))


def icosahedron(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    phi = (1.0 + math.sqrt(5.0)) / 2.0
    pts = []
    for a in (-1.0, 1.0):
        for b in (-phi, phi):
            pts += [[0.0, a, b], [a, b, 0.0], [b, 0.0, a]]
    x = torch.tensor(pts, dtype=dtype)
    return x / x.norm(dim=1, keepdim=True)


def test_hard_mhs_icosahedron_sums_all_thirty_tied_edges() -> None:
    w = icosahedron()
    c = (1.0 / math.sqrt(5.0)) / (1.0 + 1e-4)
    expected = torch.tensor(-30.0 * (2.0 - 2.0 * c), dtype=torch.float64)
    assert_close(F.hyperspherical_separation(w), expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("temperature", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("half_space", SPACES)
def test_soft_mhs_equals_tau_log_mean_exp_definition(temperature: float, half_space: bool) -> None:
    w = fixed_weights(n=8, d=3, seed=4)
    got = F.soft_hyperspherical_separation(w, temperature=temperature, half_space=half_space)
    assert_close(got, official.soft_mhs(w, temperature, half_space))
    obj = MHS(half_space=half_space, temperature=temperature)(w)
    assert_close(obj, official.soft_mhs(w, temperature, half_space))


def test_soft_mhs_tends_to_minus_min_distance_and_is_bounded_by_it() -> None:
    w = fixed_weights(n=8, d=3, seed=5)
    sq_min = official.upper(2.0 - 2.0 * official.cosine_matrix(w, False)).min()
    pairs = 8 * 7 / 2
    for tau in (1.0, 0.1, 0.01):
        value = F.soft_hyperspherical_separation(w, temperature=tau)
        assert -sq_min - tau * math.log(pairs) - 1e-12 <= value <= -sq_min + 1e-12
    close = F.soft_hyperspherical_separation(w, temperature=1e-4)
    assert abs(float(close + sq_min)) < 1e-3


@pytest.mark.parametrize("half_space", SPACES)
@pytest.mark.parametrize(("n", "d"), [(9, 5), (13, 4)])
def test_mgd_equals_minus_logdet_of_official_concatenated_kernel(half_space: bool, n: int, d: int) -> None:
    w = fixed_weights(n=n, d=d, seed=6)
    got = F.gram_determinant_penalty(w, half_space=half_space)
    assert_close(got, official.mgd(w, half_space), rtol=1e-9, atol=1e-9)
    assert_close(MGD(half_space=half_space)(w), official.mgd(w, half_space), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("half_space", SPACES)
def test_mhp_pole_energy_equals_mean_inverse_squared_distance_to_pole(half_space: bool) -> None:
    w = fixed_weights(seed=7)
    pole = torch.randn(5, generator=torch.Generator().manual_seed(70), dtype=torch.float64) * 1.7
    got = F.pole_energy(w, pole, half_space=half_space)
    assert_close(got, official.mhp_pole_energy(w, pole, half_space))


#: (ours, the official formula) of the neurons against a fixed pole
POLE_OBJECTIVES = {
    "mhp": (F.pole_energy, official.mhp_pole_energy),
    "mhc": (
        lambda w, v, half_space: F.pole_covering_distance(w, v, gamma=10.0, half_space=half_space),
        lambda w, v, half_space: official.mhc_covering(w, v, 10.0, half_space),
    ),
}


@pytest.mark.parametrize("objective", sorted(POLE_OBJECTIVES))
@pytest.mark.parametrize("half_space", SPACES)
@pytest.mark.parametrize("scale", [1.0, 1e15])
def test_pole_objectives_closed_form_neuron_gradient_equals_autograd_of_the_official_formula(
    objective, half_space, scale
) -> None:
    """With a fixed pole (the neurons' penalty) the gradient is formed in closed form; it must equal
    autograd through the official formula, also for float32 rows large enough to be rescaled."""
    ours_fn, official_fn = POLE_OBJECTIVES[objective]
    w = fixed_weights(n=17, d=6, seed=11) * scale
    pole = torch.randn(6, generator=torch.Generator().manual_seed(110), dtype=torch.float64)
    dtype = torch.float32 if scale > 1 else torch.float64
    ours = w.to(dtype).clone().requires_grad_()
    value = ours_fn(ours, pole.to(dtype), half_space=half_space)
    value.backward()
    reference = w.clone().requires_grad_()
    expected = official_fn(reference, pole, half_space=half_space)
    expected.backward()
    tol = {"rtol": 1e-5, "atol": 0.0} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-14}
    assert_close(value.double(), expected, **tol)
    assert_close(ours.grad.double(), reference.grad, rtol=tol["rtol"], atol=1e-6 * float(reference.grad.abs().max()))


@pytest.mark.parametrize("gamma", [1.0, 10.0, 50.0])
@pytest.mark.parametrize("half_space", SPACES)
def test_mhc_covering_distance_equals_its_log_mean_exp_formula(gamma: float, half_space: bool) -> None:
    w = fixed_weights(seed=8)
    pole = torch.randn(5, generator=torch.Generator().manual_seed(80), dtype=torch.float64)
    got = F.pole_covering_distance(w, pole, gamma=gamma, half_space=half_space)
    assert_close(got, official.mhc_covering(w, pole, gamma, half_space))


def test_mhp_and_mhc_objects_neuron_penalty_uses_the_official_formulas() -> None:
    from lightning_hsu.regularizers import MHC, MHP

    w = fixed_weights(seed=9)
    pole = torch.randn(5, generator=torch.Generator().manual_seed(90), dtype=torch.float64)
    for half in (False, True):
        assert_close(MHP(half_space=half).neuron_penalty(w, pole), -official.mhp_pole_energy(w, pole, half))
        assert_close(MHC(half_space=half).neuron_penalty(w, pole), official.mhc_covering(w, pole, 10.0, half))


def test_rmhp_is_norm_of_sum_of_raw_unnormalised_neurons() -> None:
    w = fixed_weights(seed=10)
    assert_close(F.relaxed_polarization(w), official.rmhp(w))
    assert_close(RMHP()(w), official.rmhp(w))
    assert_close(F.relaxed_polarization(3.0 * w), 3.0 * official.rmhp(w))  # not scale-invariant


@pytest.mark.parametrize("half_space", SPACES)
@pytest.mark.parametrize(("power", "distance"), [(2.0, "euclidean"), (0.0, "euclidean"), (1.0, "angular")])
def test_comhe_equals_loop_of_official_mhe_over_projections(power: float, distance: str, half_space: bool) -> None:
    w = fixed_weights(n=10, d=12, seed=11)
    # Scaled so that the projected neurons have norms ~1: with norms ~10 the antipodal pairs of
    # half-space reach |c| > 1 - 1e-6 and the (documented) arccos clamp would kick in.
    proj = 0.2 * torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(110), dtype=torch.float64)
    got = F.compressive_energy(w, proj, power=power, distance=distance, half_space=half_space)
    assert_close(got, official.comhe(w, proj, power, distance, half_space), rtol=1e-9, atol=1e-11)


def test_comhe_object_with_fixed_projections_equals_loop_over_its_matrices() -> None:
    w = fixed_weights(n=10, d=12, seed=12)
    reg = CoMHE(projection_dim=3, projections=5, resample=False, half_space=True, seed=4)
    proj = reg.projection_matrices(12, step=0, device=w.device).to(torch.float64)
    assert proj.shape == (5, 3, 12)
    assert_close(reg(w, step=0), official.comhe(w, proj, 2.0, "euclidean", True), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("t", [0.5, 2.0, 8.0])
@pytest.mark.parametrize("half_space", SPACES)
def test_uniformity_equals_wang_isola_pdist_one_liner_on_unit_rows(t: float, half_space: bool) -> None:
    w = fixed_weights(n=12, d=6, seed=13)
    got = F.uniformity(w, t=t, half_space=half_space, eps=1e-14)
    assert_close(got, official.wang_isola_uniformity(w, t, half_space, eps=1e-14), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("half_space", SPACES)
def test_uniformity_with_official_eps_uses_d2_equal_2_minus_2c(half_space: bool) -> None:
    # With eps = 1e-4 the rows are not exactly unit; the library keeps the official d^2 = 2 - 2c
    # (as MHE does), which differs from pdist's ||x_i - x_j||^2 by O(eps / ||w||^2).
    w = fixed_weights(n=12, d=6, seed=14)
    got = F.uniformity(w, t=2.0, half_space=half_space)
    assert_close(got, official.gaussian_energy_via_cosine(w, 2.0, half_space))
    assert_close(Uniformity(t=2.0, half_space=half_space)(w), official.gaussian_energy_via_cosine(w, 2.0, half_space))
    assert_close(got, official.wang_isola_uniformity(w, 2.0, half_space), rtol=0.0, atol=5e-3)


def test_uniformity_large_t_does_not_underflow_where_the_naive_one_liner_does() -> None:
    w = fixed_weights(n=12, d=6, seed=15)
    t = 50000.0
    naive = official.wang_isola_uniformity(w, t, eps=1e-14)
    assert torch.isinf(naive)  # exp underflows to 0 in float64
    got = F.uniformity(w, t=t, eps=1e-14)
    assert torch.isfinite(got)
    sq = torch.pdist(official.unit(w, 1e-14)).pow(2)
    expected = torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())
    assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("half_space", SPACES)
def test_mgd_closed_form_gradient_equals_autograd_of_official_concatenated_kernel(half_space: bool) -> None:
    w = fixed_weights(n=11, d=4, seed=16).requires_grad_(True)
    official.mgd(w, half_space).backward()
    expected = w.grad.clone()
    w.grad = None
    F.gram_determinant_penalty(w, half_space=half_space).backward()
    assert_close(w.grad, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("half_space", SPACES)
def test_mgd_batched_value_and_gradient_equal_each_layer_alone(half_space: bool) -> None:
    layers = torch.stack([fixed_weights(n=8, d=6, seed=s) for s in (17, 18, 19)]).requires_grad_(True)
    weight = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (F.gram_determinant_penalty(layers, half_space=half_space) * weight).sum().backward()
    for i in range(3):
        one = layers.detach()[i].clone().requires_grad_(True)
        value = official.mgd(one, half_space)
        (value * weight[i]).backward()
        assert_close(F.gram_determinant_penalty(layers.detach()[i], half_space=half_space), value.detach())
        assert_close(layers.grad[i], one.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("half_space", SPACES)
def test_mgd_float32_gradient_of_crowded_neurons_keeps_its_digits(half_space: bool) -> None:
    # 400 neurons in R^3: the kernel's inverse is large and the rows of the gradient product cancel
    # to a few digits (a float32 product gave a 100% error here)
    w = torch.randn(400, 3, generator=torch.Generator().manual_seed(20))
    w32 = w.clone().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    F.gram_determinant_penalty(w32, half_space=half_space).backward()
    F.gram_determinant_penalty(w64, half_space=half_space).backward()
    assert w32.grad.dtype == torch.float32
    assert float((w32.grad.double() - w64.grad).norm() / w64.grad.norm()) < 1e-3
