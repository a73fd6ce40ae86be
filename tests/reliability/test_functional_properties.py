"""Property-based tests of the pure-torch core (``lightning_hsu.functional``) and of the regularizer
objects built on it: hostile shapes, dtypes, scales and degenerate rows.

Promises checked (see ``docs/reliability.md``):

* finite weights of any float dtype and any scale in 10^-20 .. 10^20, with zero, repeated or
  antipodal rows: every penalty returns a finite value and a finite gradient, in the gradient's
  own dtype for fp32/fp64 and computed in float32 for bf16/fp16 (see
  :func:`test_every_penalty_is_finite_with_a_finite_gradient_on_finite_weights`);
* NaN or inf weights (including an fp16/bf16 cast that overflowed): a ``ValueError`` that says so;
* permutation and rotation invariance, sign-flip invariance in half-space;
* any ``chunk_size`` gives the dense value and gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_hsu.regularizers import MGD, MHC, MHE, MHP, MHS, RMHP, CoMHE, Uniformity
from reliability.strategies import PENALTIES, neuron_matrices, nonfinite_matrices, random_rotation

PROPERTY = settings.get_profile("reliability")

REGULARIZERS = {
    "MHE": lambda: MHE(power=2.0, half_space=True),
    "MHE_angular": lambda: MHE(power=1.0, distance="angular"),
    "MHS": lambda: MHS(half_space=True),
    "MHS_soft": lambda: MHS(temperature=0.1),
    "MHP": lambda: MHP(half_space=True, inner_steps=2),
    "MHC": lambda: MHC(inner_steps=2),
    "MGD": lambda: MGD(half_space=True),
    "RMHP": lambda: RMHP(),
    "CoMHE": lambda: CoMHE(projection_dim=3, projections=2, half_space=True),
    "Uniformity": lambda: Uniformity(half_space=True),
}


def _leaf(w: torch.Tensor) -> torch.Tensor:
    return w.detach().clone().requires_grad_(True)


def _value_and_grad(fn, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = _leaf(w)
    value = fn(leaf)
    value.backward()
    assert leaf.grad is not None
    return value.detach(), leaf.grad


def _gradient_in_compute_precision(fn, w: torch.Tensor) -> torch.Tensor:
    """The gradient as the core computes it: float32 for bf16/fp16 (the dtype it computes in),
    then the value of a bf16/fp16 gradient is that number rounded to the half dtype."""
    leaf = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32).requires_grad_(True)
    fn(leaf).backward()
    assert leaf.grad is not None
    return leaf.grad


def _is_finite_input(w: torch.Tensor) -> bool:
    return bool(torch.isfinite(w).all())


@settings(PROPERTY, max_examples=max(1, PROPERTY.max_examples * 3 // 5))  # up to 300 x 300: the costliest
@given(w=neuron_matrices())
def test_every_penalty_is_finite_with_a_finite_gradient_on_finite_weights(w):
    """One example runs every penalty (the cost is in the penalties, not in drawing weights)."""
    for penalty in PENALTIES:
        fn = lambda x, penalty=penalty: penalty.call(x, None)  # noqa: E731
        if not _is_finite_input(w):  # an fp16/bf16 cast overflowed to inf: a non-finite input
            with pytest.raises(ValueError, match="NaN or inf"):
                fn(_leaf(w))
            continue
        value, grad = _value_and_grad(fn, w)
        assert value.dim() == 0 and math.isfinite(float(value)), (penalty.name, float(value))
        assert grad.dtype == w.dtype and grad.shape == w.shape
        # The gradient is computed in float32/float64 and must be finite there. Cast back to fp16 it
        # may exceed 65504 (near-duplicate neurons of a Riesz energy have gradients ~1e6/|w|): that
        # is the range of fp16 parameters, not a defect of the penalty; bf16 has fp32's range.
        if w.dtype in (torch.float16, torch.bfloat16):
            full = _gradient_in_compute_precision(fn, w)
            assert torch.isfinite(full).all(), penalty.name
        if w.dtype != torch.float16:
            assert torch.isfinite(grad).all(), penalty.name


@settings(PROPERTY, max_examples=PROPERTY.max_examples // 2)
@given(w=neuron_matrices(max_n=120, max_d=120))
def test_every_regularizer_object_is_finite_or_refuses_nonfinite_weights(w):
    for name, make in REGULARIZERS.items():
        regularizer = make().spawn("layer")
        if not _is_finite_input(w):
            with pytest.raises(ValueError, match="NaN or inf"):
                regularizer(_leaf(w), step=0)
            continue
        full = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32).requires_grad_(True)
        value = regularizer(full, step=0)
        value.backward()
        assert math.isfinite(float(value.detach())), name
        assert full.grad is not None and torch.isfinite(full.grad).all(), name
        for field, state in regularizer.state_dict().items():
            if isinstance(state, torch.Tensor):
                assert torch.isfinite(state).all(), (name, field)


@settings(PROPERTY)
@given(w=nonfinite_matrices())
def test_nan_or_inf_weights_are_refused_with_a_clear_error(w):
    for penalty in PENALTIES:
        with pytest.raises(ValueError, match="NaN or inf"):
            penalty.call(_leaf(w), None)


@settings(PROPERTY, max_examples=10)
@given(w=nonfinite_matrices(max_n=12, max_d=12))
def test_regularizer_objects_refuse_nan_or_inf_weights(w):
    for name, make in REGULARIZERS.items():
        with pytest.raises(ValueError, match="NaN or inf"):
            make().spawn("layer")(_leaf(w), step=0)
            pytest.fail(name)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["mhp", "mhc", "mhp_half"])
def test_a_nan_or_inf_pole_is_refused_with_a_clear_error(which, value):
    from lightning_hsu.functional import pole_covering_distance, pole_energy

    w = torch.randn(5, 3)
    pole = torch.tensor([1.0, value, 0.0])
    fn = {
        "mhp": lambda: pole_energy(w, pole),
        "mhc": lambda: pole_covering_distance(w, pole),
        "mhp_half": lambda: pole_energy(w, pole, half_space=True),
    }[which]
    with pytest.raises(ValueError, match="NaN or inf"):
        fn()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_projections_are_refused_with_a_clear_error(value):
    from lightning_hsu.functional import compressive_energy

    projections = torch.randn(2, 3, 4)
    projections[1, 0, 2] = value
    with pytest.raises(ValueError, match="NaN or inf"):
        compressive_energy(torch.randn(6, 4), projections)


# -- invariances -------------------------------------------------------------------------------------
MODERATE = dict(max_n=60, max_d=40, min_log_scale=-3.0, max_log_scale=3.0, dtypes=(torch.float64,))


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m: f"{what}: {m}")


@settings(PROPERTY, max_examples=PROPERTY.max_examples // 2)
@given(w=neuron_matrices(**MODERATE), seed=st.integers(0, 2**31 - 1))
def test_every_penalty_is_invariant_to_permuting_the_neurons(w, seed):
    perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))
    for penalty in PENALTIES:
        _close(penalty.call(w[perm], None), penalty.call(w, None), penalty.name)


@settings(PROPERTY, max_examples=PROPERTY.max_examples // 2)
@given(w=neuron_matrices(**MODERATE), seed=st.integers(0, 2**31 - 1))
def test_every_penalty_is_invariant_to_rotating_the_neurons(w, seed):
    """``W Q`` for an orthogonal ``Q`` (with the pole and the projections rotated alike)."""
    identity = torch.eye(w.shape[1], dtype=w.dtype)
    q = random_rotation(w.shape[1], seed)
    for penalty in PENALTIES:
        _close(penalty.call(w @ q, q), penalty.call(w, identity), penalty.name)


@settings(PROPERTY, max_examples=PROPERTY.max_examples // 2)
@given(w=neuron_matrices(**MODERATE), seed=st.integers(0, 2**31 - 1))
def test_half_space_penalties_ignore_the_sign_of_each_neuron(w, seed):
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(w.shape[0], 1, generator=g) < 0.5, -1.0, 1.0).to(w.dtype)
    for penalty in PENALTIES:
        if penalty.sign_invariant:
            _close(penalty.call(w * signs, None), penalty.call(w, None), penalty.name)


# -- chunked equals dense ------------------------------------------------------------------------------
@settings(PROPERTY, max_examples=PROPERTY.max_examples // 2)
@given(w=neuron_matrices(**MODERATE), data=st.data())
def test_any_chunk_size_gives_the_dense_value_and_gradient(w, data):
    """In float64, where the blocks' different summation orders cost ~1e-16 relative. (In float32
    a gradient that is a small difference of large pair terms, e.g. near-duplicate neurons in
    d = 1, differs by ~1e-7 of the *terms*, which is rounding, not a chunking error.)"""
    chunk = data.draw(st.integers(1, w.shape[0] + 2), label="chunk_size")
    for penalty in PENALTIES:
        if not penalty.chunked:
            continue
        dense_value, dense_grad = _value_and_grad(lambda x, p=penalty: p.call(x, None, chunk_size=None), w)
        value, grad = _value_and_grad(lambda x, p=penalty: p.call(x, None, chunk_size=chunk), w)
        scale = float(dense_grad.abs().max()) + 1e-30
        torch.testing.assert_close(value, dense_value, rtol=1e-9, atol=1e-12, msg=lambda m, p=penalty: f"{p.name}: {m}")
        torch.testing.assert_close(
            grad, dense_grad, rtol=1e-8, atol=1e-9 * scale, msg=lambda m, p=penalty: f"{p.name}: {m}"
        )
