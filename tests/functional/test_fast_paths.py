"""The upper-strip and full-row schedules equal the concatenation reference, value and gradient."""

from __future__ import annotations

import pytest
import torch

from lightning_hsu.functional import hyperspherical_energy
from lightning_hsu.functional.kernels import AngularKernel, GaussianKernel, RieszKernel
from lightning_hsu.functional.pairwise import pairwise_kernel_sum, symmetric_block_rows

from .reference import concat_energy, value_and_grad


def _weights(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
@pytest.mark.parametrize(("n", "chunk"), [(5, None), (37, None), (37, 1), (37, 8), (160, None), (160, 64), (160, 159)])
def test_energy_matches_concatenation(half_space: bool, power: float, n: int, chunk: int | None) -> None:
    w = _weights(n, 6)
    ours, ours_grad = value_and_grad(
        lambda x: hyperspherical_energy(x, power=power, half_space=half_space, chunk_size=chunk), w
    )
    ref, ref_grad = value_and_grad(lambda x: concat_energy(x, power, half_space), w)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-8, atol=1e-10)


def test_automatic_strips_cut_large_layers_and_keep_small_ones_dense() -> None:
    assert symmetric_block_rows(512, None) == 512
    assert symmetric_block_rows(513, None) == 128  # past one block: about 8 strips, >= 128 rows
    assert symmetric_block_rows(2048, None) == 256
    assert symmetric_block_rows(4096, None) == 512
    assert symmetric_block_rows(8192, None) == 512  # at most 2**22 entries per strip
    assert symmetric_block_rows(100_000, None) == 128
    assert symmetric_block_rows(300, 7) == 7
    # a GPU is launch-bound: the largest blocks the memory bound allows, strips only past 4096
    assert symmetric_block_rows(2048, None, "cuda") == 2048
    assert symmetric_block_rows(4096, None, "cuda") == 4096
    assert symmetric_block_rows(100_000, None, "cuda") == 4096 * 4096 // 100_000
    assert symmetric_block_rows(2048, 64, "cuda") == 64


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize(
    "kernel", [RieszKernel(2.0), RieszKernel(0.0), AngularKernel(1.0), GaussianKernel(2.0)], ids=repr
)
def test_strip_schedule_equals_full_row_schedule(half_space: bool, kernel) -> None:
    """The symmetric strips (several strip sizes, batched) equal the full-row schedule."""
    unit = torch.nn.functional.normalize(_weights(3 * 70, 5, seed=1), dim=-1).reshape(3, 70, 5)
    full_rows, full_rows_grad = value_and_grad(
        lambda u: pairwise_kernel_sum(u, kernel, half_space=half_space, shard=(0, 1)).sum(), unit
    )
    for chunk in (None, 1, 9, 35, 69, 70):
        strips, strips_grad = value_and_grad(
            lambda u, c=chunk: pairwise_kernel_sum(u, kernel, half_space=half_space, chunk_size=c).sum(), unit
        )
        torch.testing.assert_close(strips, full_rows, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(strips_grad, full_rows_grad, rtol=1e-9, atol=1e-10)


def test_duplicate_neurons_stay_finite_in_strips() -> None:
    w = _weights(200, 4)
    w[150] = w[3]
    value, grad = value_and_grad(lambda x: hyperspherical_energy(x, half_space=True, chunk_size=16), w)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("block_elements", [1, 37 * 5, 37 * 36])
def test_one_block_schedule_in_kernel_row_blocks_matches_concatenation(
    half_space: bool, block_elements: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-block schedule evaluates the kernel on row blocks written over the Gram matrix:
    blocks of 32 + 5 rows (the minimum), of 5 rows (a 2-row last block), of 36 + 1 rows."""
    from lightning_hsu.functional import pairwise

    monkeypatch.setattr(pairwise, "KERNEL_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(pairwise, "MIN_KERNEL_BLOCK_ROWS", 5 if block_elements == 37 * 5 else 32)
    w = _weights(37, 6, seed=4)
    ours, ours_grad = value_and_grad(lambda x: hyperspherical_energy(x, power=2.0, half_space=half_space), w)
    ref, ref_grad = value_and_grad(lambda x: concat_energy(x, 2.0, half_space), w)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-8, atol=1e-10)


def _clamped_riesz(cos: torch.Tensor, power: float) -> torch.Tensor:
    """f(c) from the definition: d^2 = max(2 - 2c, 1e-6), f = d^-s or -log d^2 (s = 0)."""
    sq = (2.0 - 2.0 * cos).clamp_min(1e-6)
    return -torch.log(sq) if power == 0 else sq.pow(-power / 2.0)


def _clamped_riesz_pair(cos: torch.Tensor, power: float) -> torch.Tensor:
    """f(c) + f(-c) from the definition."""
    return _clamped_riesz(cos, power) + _clamped_riesz(-cos, power)


@pytest.mark.parametrize("power", [0.0, 2.0])
def test_closed_form_half_space_term_equals_the_two_kernel_terms(power: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """1/((1-c)(1+c)) and -log(4(1-c)(1+c)) (s = 2, 0) with their derivatives, up to the clamp's edge."""
    from lightning_hsu.functional.kernels import PairKernel

    cos = torch.cat([torch.linspace(-1 + 1e-5, 1 - 1e-5, 2001, dtype=torch.float64), torch.tensor([0.0, 1e-9])])
    leaf = cos.clone().requires_grad_()
    ref = _clamped_riesz_pair(leaf, power)
    (ref_deriv,) = torch.autograd.grad(ref.sum(), leaf)

    def generic(*args, **kwargs):  # the two-evaluation default must not run on this data
        raise AssertionError("the closed form was not taken")

    monkeypatch.setattr(PairKernel, "antipodal_sum", generic)
    value, deriv = RieszKernel(power).antipodal_sum(cos.view(1, 1, -1), True, derivative_scale=3.0, host_sync=True)
    torch.testing.assert_close(value.view(-1), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(deriv.view(-1), 3.0 * ref_deriv, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("power", [0.0, 2.0])
@pytest.mark.parametrize("edge", [1.0 - 1e-7, -1.0 + 1e-7, 1.0 + 1e-12])
def test_half_space_term_at_the_clamp_keeps_the_clamped_values_and_zero_slope(power: float, edge: float) -> None:
    """A pair at (or past) d^2 = 1e-6 on either side: the clamped side is constant, the other keeps its slope."""
    cos = torch.tensor([[[0.3, edge, -0.5]]], dtype=torch.float64)
    value, deriv = RieszKernel(power).antipodal_sum(cos, True, host_sync=True)
    leaf = cos.clone().requires_grad_()
    ref = _clamped_riesz_pair(leaf, power)
    (ref_deriv,) = torch.autograd.grad(ref.sum(), leaf)
    torch.testing.assert_close(value, ref.detach(), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(deriv, ref_deriv, rtol=1e-9, atol=0.0)
    # the clamped term's slope is zero: only the unclamped one is left (d/dc of f(-c))
    other = 2.0 + 2.0 * abs(edge)
    slope = -2.0 / other**2 if power == 2.0 else -2.0 / other
    assert deriv[0, 0, 1].item() == pytest.approx(slope if edge > 0 else -slope, rel=1e-6)


@pytest.mark.parametrize("power", [0.0, 2.0])
def test_closed_form_half_space_term_is_as_accurate_in_float32_as_the_two_terms(
    power: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against float64 from the definition, near c = 0 and c = +-1 (angles down to ~0.3 degree).

    Errors are relative to the size of the two terms (value f(c) and f(-c); slope f'(c) and
    f'(-c)), whose difference the slope is: near c = 0 it cancels, in float64 too."""
    gap = torch.logspace(-5, -0.01, 400, dtype=torch.float64)  # 1 - |c|, above the clamp's margin
    cos32 = torch.cat([1.0 - gap, gap - 1.0, torch.linspace(-0.5, 0.5, 401, dtype=torch.float64)]).float()
    exact = cos32.double()  # the float32 inputs, evaluated in float64
    terms, slopes = [], []
    for sign in (1.0, -1.0):
        leaf = exact.clone().requires_grad_()
        term = _clamped_riesz(sign * leaf, power)  # f(c), then f(-c)
        (slope,) = torch.autograd.grad(term.sum(), leaf)
        terms.append(term.detach())
        slopes.append(slope)
    ref_value, ref_slope = terms[0] + terms[1], slopes[0] + slopes[1]
    value_scale, slope_scale = terms[0].abs() + terms[1].abs(), slopes[0].abs() + slopes[1].abs()
    two_terms = RieszKernel(power).antipodal_sum(cos32.view(1, 1, -1), True, host_sync=False)
    from lightning_hsu.functional.kernels import PairKernel

    monkeypatch.setattr(PairKernel, "antipodal_sum", None)  # the closed form must not fall back
    closed = RieszKernel(power).antipodal_sum(cos32.view(1, 1, -1), True, host_sync=True)

    def worst(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
        return float(((got.view(-1).double() - want) / scale).abs().max())

    for i, (want, scale) in enumerate([(ref_value, value_scale), (ref_slope, slope_scale)]):
        closed_error, terms_error = worst(closed[i], want, scale), worst(two_terms[i], want, scale)
        assert closed_error <= max(2.0 * terms_error, 1e-6), (i, closed_error, terms_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("half_space", [False, True])
def test_a_batch_of_one_block_gram_matrices_in_groups_equals_the_whole_batch_and_the_reference(
    half_space: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CoMHE's 7 projections of 60 neurons, in groups of 3, 3 and 1 Gram matrices (float32: through the compiled
    kernel where it is built): the same value and gradient as all at once, bit for bit, and as the float64
    statement of the formula."""
    from lightning_hsu.functional import compressive_energy, pairwise

    from .reference import pairwise_compressive

    w = _weights(60, 24).to(dtype)
    projections = torch.randn(7, 8, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def ours(x: torch.Tensor) -> torch.Tensor:
        return compressive_energy(x, projections.to(dtype), half_space=half_space)

    whole = value_and_grad(ours, w)
    monkeypatch.setattr(pairwise, "DENSE_GROUP_ELEMENTS", 3 * 60 * 60)
    calls: list[int] = []
    original = pairwise.gram
    monkeypatch.setattr(pairwise, "gram", lambda rows: calls.append(rows.shape[0]) or original(rows))
    grouped = value_and_grad(ours, w)
    assert calls == [3, 3, 1]
    assert torch.equal(grouped[0], whole[0]) and torch.equal(grouped[1], whole[1])
    ref = value_and_grad(lambda x: pairwise_compressive(x, projections, half_space), w.double())
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(grouped[0].double(), ref[0], **tol)
    torch.testing.assert_close(grouped[1].double(), ref[1], **tol)
