"""Degenerate inputs and reduced precision.

Zero-norm, duplicate and antipodal neurons, n = 0, 1, 2, in fp32, bf16 and fp16: every
regulariser gives a finite value and a finite gradient; fewer than two neurons give 0 for the
pairwise penalties; ``arccos`` at +-1 gives no NaN. bf16/fp16 weights are promoted to float32
(same value as the fp32 copy of the same weights), and ``torch.autocast`` does not reach the core.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import lightning_hsu.functional as F
from lightning_hsu.regularizers import MGD, MHC, MHE, MHP, MHS, RMHP, CoMHE, Uniformity

D = 4
POLE = torch.tensor([0.3, -1.2, 0.5, 0.8])
PROJ = torch.randn(3, 3, D, generator=torch.Generator().manual_seed(0))

Penalty = Callable[[torch.Tensor], torch.Tensor]
PAIRWISE: dict[str, Penalty] = {}
for _half in (False, True):
    _sp = "half" if _half else "full"
    for _p, _dist in ((0.0, "euclidean"), (1.0, "euclidean"), (2.0, "euclidean"), (1.5, "euclidean"),
                      (0.0, "angular"), (1.0, "angular"), (2.0, "angular")):  # fmt: skip
        PAIRWISE[f"mhe-{_dist}-{_p}-{_sp}"] = lambda w, p=_p, d=_dist, h=_half: F.hyperspherical_energy(
            w, power=p, distance=d, half_space=h
        )
    PAIRWISE[f"mhs-hard-{_sp}"] = lambda w, h=_half: F.hyperspherical_separation(w, half_space=h)
    PAIRWISE[f"mhs-soft-{_sp}"] = lambda w, h=_half: F.soft_hyperspherical_separation(w, temperature=0.1, half_space=h)
    PAIRWISE[f"mgd-{_sp}"] = lambda w, h=_half: F.gram_determinant_penalty(w, half_space=h)
    PAIRWISE[f"uniformity-{_sp}"] = lambda w, h=_half: F.uniformity(w, t=2.0, half_space=h)
    PAIRWISE[f"comhe-{_sp}"] = lambda w, h=_half: F.compressive_energy(w, PROJ, half_space=h)

OTHERS: dict[str, Penalty] = {
    "rmhp": F.relaxed_polarization,
    "mhp-full": lambda w: F.pole_energy(w, POLE),
    "mhp-half": lambda w: F.pole_energy(w, POLE, half_space=True),
    "mhc-full": lambda w: F.pole_covering_distance(w, POLE),
    "mhc-half": lambda w: F.pole_covering_distance(w, POLE, half_space=True),
}
ALL: dict[str, Penalty] = {**PAIRWISE, **OTHERS}

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def _base(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _zero_neuron() -> torch.Tensor:
    w = _base(5)
    w[2] = 0.0
    return w


def _two_zero_neurons() -> torch.Tensor:
    w = _base(5)
    w[1] = 0.0
    w[3] = 0.0
    return w


def _duplicates() -> torch.Tensor:
    w = _base(5)
    w[1] = w[0]
    return w


def _antipodal() -> torch.Tensor:
    w = _base(5)
    w[1] = -w[0]
    return w


def _large_duplicates_and_antipodes() -> torch.Tensor:
    # norm ~ 300: cosines within 1e-6 of +-1 even with the eps = 1e-4 normaliser
    w = _base(6, seed=1)
    w = 300.0 * w / w.norm(dim=1, keepdim=True)
    w[1] = w[0]
    w[2] = -w[0]
    return w


def _all_identical() -> torch.Tensor:
    return _base(1).repeat(4, 1)


INPUTS: dict[str, Callable[[], torch.Tensor]] = {
    "zero-neuron": _zero_neuron,
    "two-zero-neurons": _two_zero_neurons,
    "duplicates": _duplicates,
    "antipodal": _antipodal,
    "large-norm-duplicates-antipodes": _large_duplicates_and_antipodes,
    "all-identical": _all_identical,
    "n=1": lambda: _base(1),
    "n=2": lambda: _base(2),
    "n=2-duplicate": lambda: _base(1).repeat(2, 1),
    "n=2-antipodal": lambda: torch.cat([_base(1), -_base(1)]),
}


def value_and_grad(fn: Penalty, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = w.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(INPUTS))
def test_degenerate_input_gives_finite_value_and_finite_gradient_for_every_penalty(
    case: str, dtype: torch.dtype
) -> None:
    w = INPUTS[case]().to(dtype)
    failures = []
    for name, fn in sorted(ALL.items()):
        value, grad = value_and_grad(fn, w)
        if value.dtype != torch.float32 or value.dim() != 0 or not torch.isfinite(value):
            failures.append(f"{name}: value {value!r} (want a finite float32 scalar)")
        if grad.dtype != dtype or grad.shape != w.shape:
            failures.append(f"{name}: gradient {grad.dtype} {tuple(grad.shape)}")
        bad = ~torch.isfinite(grad)
        if bad.any():
            # The only admissible non-finite entries: an fp16 weight whose exact gradient exceeds
            # fp16's range (65504), e.g. the angular a2 energy of two duplicate neurons, whose
            # radial gradient (through the eps normaliser) is ~9e4: the cast to fp16 overflows.
            exact = value_and_grad(fn, w.float())[1]
            admissible = dtype == torch.float16 and bool(torch.isfinite(exact).all())
            if not (admissible and bool((exact[bad].abs() > 65504).all())):
                failures.append(f"{name}: non-finite gradient {grad}")
    assert not failures, f"{case} in {dtype}:\n" + "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_neurons_give_zero_with_zero_gradient_for_every_pairwise_penalty(
    n: int, dtype: torch.dtype
) -> None:
    w = _base(n).to(dtype) if n else torch.zeros(0, D, dtype=dtype)
    for name, fn in sorted(PAIRWISE.items()):
        value, grad = value_and_grad(fn, w)
        assert float(value.detach()) == 0.0, name
        assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("half_space", [False, True])
def test_angular_energy_at_cosine_exactly_plus_minus_one_has_no_nan(power: float, half_space: bool) -> None:
    # Unit-norm neurons with eps = 0 give cosines of exactly 1 and -1 (arccos' derivative is
    # infinite there; the library clamps first).
    e = torch.eye(3, dtype=torch.float64)
    w = torch.stack([e[0], e[0], -e[0], e[1], e[2]])
    x = w.clone().requires_grad_(True)
    value = F.hyperspherical_energy(x, power=power, distance="angular", half_space=half_space, eps=0.0)
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_duplicate_neurons_give_large_but_finite_energy() -> None:
    w = _duplicates().double()
    distinct = F.hyperspherical_energy(_base(5).double(), power=2.0)
    dup = F.hyperspherical_energy(w, power=2.0)
    assert torch.isfinite(dup) and dup > 100.0 * distinct


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("name", sorted(ALL))
def test_low_precision_weights_are_promoted_to_float32(name: str, dtype: torch.dtype, rtol: float) -> None:
    w = _base(9, seed=3) * 2.0
    fn = ALL[name]
    low = w.to(dtype)
    promoted = fn(low)
    assert promoted.dtype == torch.float32
    # exactly the fp32 computation on the same (rounded) weights ...
    torch.testing.assert_close(promoted, fn(low.float()), rtol=1e-6, atol=1e-6)
    # ... hence within the input rounding of the fp32 value of the unrounded weights
    torch.testing.assert_close(promoted, fn(w), rtol=rtol, atol=rtol)


def test_fp16_gradient_overflow_of_duplicate_pair_is_the_exact_gradient_out_of_fp16_range() -> None:
    # Documents the one exception admitted above: the fp32 gradient is finite and simply too
    # large for fp16; nothing is NaN and the value itself is finite.
    w = _base(1).repeat(2, 1).half()
    fn = PAIRWISE["mhe-angular-2.0-full"]
    value, grad16 = value_and_grad(fn, w)
    _, grad32 = value_and_grad(fn, w.float())
    assert torch.isfinite(value) and torch.isfinite(grad32).all()
    assert float(grad32.abs().max()) > torch.finfo(torch.float16).max
    finite = torch.isfinite(grad16)
    assert not torch.isnan(grad16).any()
    torch.testing.assert_close(grad16[finite].float(), grad32[finite], rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", sorted(ALL))
def test_autocast_bf16_forward_gives_fp32_value_and_gradient(name: str) -> None:
    # As under Lightning's mixed precision: forward inside autocast, backward outside it.
    fn = ALL[name]
    w = _base(9, seed=4)
    ref_value, ref_grad = value_and_grad(fn, w)
    x = w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_autocast_does_not_reach_the_chunked_core_even_in_backward() -> None:
    # The pairwise core forms its gradient in the forward pass, so even a backward run inside
    # the autocast context (not what Lightning does) is exact.
    w = torch.randn(40, 8, generator=torch.Generator().manual_seed(5))
    fn = lambda x: F.hyperspherical_energy(x, power=2.0, half_space=True, chunk_size=7)  # noqa: E731
    ref_value, ref_grad = value_and_grad(fn, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, grad = value_and_grad(fn, w)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


OBJECTS: dict[str, Callable[[], object]] = {
    "MHE": lambda: MHE(power=0.0, distance="angular", half_space=True),
    "MHS-hard": lambda: MHS(half_space=True),
    "MHS-soft": lambda: MHS(temperature=0.1),
    "MGD": lambda: MGD(half_space=True),
    "RMHP": RMHP,
    "Uniformity": Uniformity,
    "CoMHE": lambda: CoMHE(projection_dim=3, projections=2),
    "MHP": lambda: MHP(half_space=True, inner_steps=2),
    "MHC": lambda: MHC(half_space=True, inner_steps=2),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["zero-neuron", "duplicates", "antipodal", "n=1", "n=2"])
@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_regularizer_objects_on_degenerate_input_stay_finite(name: str, case: str, dtype: torch.dtype) -> None:
    reg = OBJECTS[name]()
    w = INPUTS[case]().to(dtype)
    value, grad = value_and_grad(lambda x: reg(x, step=0), w)  # type: ignore[operator]
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    pole = getattr(reg, "pole", None)
    if pole is not None:  # the pole's inner optimisation on degenerate neurons stays finite too
        assert torch.isfinite(pole).all()


@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_huge_norm_fp32_neurons_do_not_overflow_and_keep_their_directions(scale: float) -> None:
    # ||w||^2 overflows float32 above ~1.8e19: the normaliser must still see the direction.
    w = _base(6, seed=6)
    unit = w / w.norm(dim=1, keepdim=True)
    failures = []
    for name, fn in sorted(ALL.items()):
        if name == "rmhp":
            continue  # raw weights by definition
        value, grad = value_and_grad(fn, unit * scale)
        expected = fn(unit.double() * 1e4).float()  # norms where eps = 1e-4 is negligible
        if not (torch.isfinite(value) and torch.isfinite(grad).all()):
            failures.append(f"{name}: non-finite value or gradient")
        elif not torch.allclose(value, expected, rtol=1e-4, atol=1e-4):
            failures.append(f"{name}: {float(value.detach())} vs {float(expected)} at moderate norms")
    assert not failures, "\n".join(failures)


def test_normaliser_is_continuous_across_its_overflow_guard() -> None:
    # Rows with entries above finfo(float32).max ** 0.25 (~1.8e9) are rescaled before squaring;
    # w / sqrt(||w||^2 + eps) must not change there (eps / ||w||^2 < 1e-22 on both sides).
    guard = torch.finfo(torch.float32).max ** 0.25
    w = _base(3, seed=7)
    unit = w / w.norm(dim=1, keepdim=True)
    below = F.normalize_neurons(unit / unit.abs().amax(1, keepdim=True) * (guard / 2))
    above = F.normalize_neurons(unit / unit.abs().amax(1, keepdim=True) * (guard * 2))
    torch.testing.assert_close(below, unit, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(above, unit, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("penalty", ["mhe", "hard mhs", "mgd"])
def test_gradient_of_rows_rescaled_against_overflow_is_divided_by_their_scale(penalty: str, half_space: bool) -> None:
    # The penalty depends on directions only, so for w_i = s_i u_i (unit u_i) its gradient is
    # the unit rows' tangential gradient divided by s_i (norms >= 50: eps = 1e-4 is negligible).
    # Rows of 1e30 go through the normaliser's overflow guard (its divisor), the others do not.
    # n <= d: MHE's gradient is one product, formed in backward. Rows 1 and 3 (both of 1e30) are
    # the closest pair, so hard MHS's gradient lies on rescaled rows only.
    fn = {
        "mhe": lambda x, **kw: F.hyperspherical_energy(x, half_space=half_space, **kw),
        "hard mhs": lambda x, **kw: F.hyperspherical_separation(x, half_space=half_space, **kw),
        "mgd": lambda x, **kw: F.gram_determinant_penalty(x, half_space=half_space, **kw),
    }[penalty]
    g = torch.Generator().manual_seed(21)
    raw = torch.randn(6, 10, generator=g, dtype=torch.float64)
    raw[3] = raw[1] + 0.05 * torch.randn(10, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(raw, dim=1)
    scale = torch.tensor([100.0, 1e30, 300.0, 1e30, 50.0, 200.0], dtype=torch.float64).unsqueeze(1)
    w = (u * scale).float().requires_grad_(True)
    fn(w).backward()
    x = u.clone().requires_grad_(True)
    fn(x, eps=1e-300).backward()
    assert x.grad is not None and x.grad[[1, 3]].abs().amax() > 0
    tangential = x.grad - (x.grad * u).sum(1, keepdim=True) * u
    expected = tangential / scale
    assert w.grad is not None
    torch.testing.assert_close(w.grad.double() * scale, expected * scale, rtol=2e-4, atol=2e-5)


# ---- uniformity without its shift: the largest t for which no kernel value underflows ---------
def _lse_uniformity_float64(w: torch.Tensor, t: float, half_space: bool) -> torch.Tensor:
    """The Wang–Isola uniformity in float64 by ``torch.logsumexp`` over the pairs, with d^2 = 2 - 2c."""
    x = w.to(torch.float64)
    unit = x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)  # eps=1e-6 below
    if half_space:
        unit = torch.cat([unit, -unit])
    cos = unit @ unit.T
    i, j = torch.triu_indices(len(unit), len(unit), offset=1)
    return torch.logsumexp(-t * (2.0 - 2.0 * cos[i, j]), dim=0) - math.log(len(i))


def test_gaussian_shift_is_needed_exactly_where_exp_of_minus_4t_leaves_the_normal_range() -> None:
    from lightning_hsu.functional.uniformity import gaussian_shift_needed

    # e^{-4t} >= 2^16 * tiny: float32 tiny = 2^-126, so 4t <= 110 ln 2 = 76.25
    assert not gaussian_shift_needed(19.0, torch.float32)
    assert gaussian_shift_needed(19.1, torch.float32)
    # float64 tiny = 2^-1022: 4t <= 1006 ln 2 = 697.3
    assert not gaussian_shift_needed(174.0, torch.float64)
    assert gaussian_shift_needed(174.4, torch.float64)


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("t", [2.0, 19.0, 19.5, 60.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_uniformity_on_either_side_of_the_shift_equals_float64_logsumexp(
    t: float, half_space: bool, dtype: torch.dtype
) -> None:
    # antipodal rows: the far pairs' kernel e^{-4t} is the smallest a unit vector can give
    w = _base(6, seed=3)
    w = torch.cat([w, -w[:2] * 1.5]).to(dtype).requires_grad_()
    w64 = w.detach().to(torch.float64).requires_grad_()
    expected = _lse_uniformity_float64(w64, t, half_space)
    expected.backward()
    got = F.uniformity(w, t=t, half_space=half_space, eps=1e-6)
    got.backward()
    assert got.dtype == dtype and torch.isfinite(got)
    if dtype == torch.float64:
        torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w.grad, w64.grad, rtol=1e-9, atol=1e-12)
        return
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    if t < 19.1:  # unshifted (beyond, the far pairs' gradients cancel to float32 rounding either way)
        scale = float(w64.grad.abs().max())
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("n", [1, 5])
def test_uniformity_of_non_finite_features_names_the_features(n: int) -> None:
    from lightning_hsu.functional import NonFiniteInputError

    x = _base(n)
    x[0, 1] = math.nan
    with pytest.raises(NonFiniteInputError, match=r"^features contain NaN"):
        F.uniformity(x)
