"""TF32 and bfloat16 operands for the pair sums' products (``precision=``).

The rounding is checked against its definition (the float64 mantissa rounded to 11 or 8
significant bits, ties to even); the energies against the float64 formula, within the error the
rounding of the operands allows; the option's way from a `Rule` to the products.
"""

from __future__ import annotations

import pytest
import torch

from lightning_hsu import MHE, CoMHE, Rule
from lightning_hsu.functional import compressive_energy, hyperspherical_energy
from lightning_hsu.functional._matmul import batched_matmul, product_precision, round_operand

from .reference import pairwise_energy

#: Significant bits of each operand format (the implicit leading one included).
SIGNIFICANT_BITS = {"tf32": 11, "bfloat16": 8}


def _rounded_by_definition(x: torch.Tensor, bits: int) -> torch.Tensor:
    mantissa, exponent = torch.frexp(x.double())  # x = m 2^e, 0.5 <= |m| < 1
    scale = 2.0**bits
    return torch.ldexp(torch.round(mantissa * scale) / scale, exponent)  # torch.round: ties to even


@pytest.mark.parametrize("precision", ["tf32", "bfloat16"])
def test_operands_are_rounded_to_nearest_even(precision: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-20, 20, 4096)
    # ties: a value exactly halfway between two representable neighbours, both parities
    bits = SIGNIFICANT_BITS[precision]
    halfway = torch.tensor([1.0 + 2.0 ** (1 - bits), 1.0 + 3 * 2.0 ** (1 - bits)]) * 1.5
    x = torch.cat([x, halfway, -halfway, torch.zeros(1)])
    torch.testing.assert_close(round_operand(x, precision).double(), _rounded_by_definition(x, bits), rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["tf32", "bfloat16"])
def test_products_inside_the_context_use_rounded_operands(precision: str) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 30, 50, generator=g), torch.randn(2, 50, 20, generator=g)
    with product_precision(precision):  # type: ignore[arg-type]
        reduced = batched_matmul(a, b)
    exact = round_operand(a, precision).double() @ round_operand(b, precision).double()
    torch.testing.assert_close(reduced.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
    assert not torch.allclose(reduced, batched_matmul(a, b), rtol=0, atol=0)  # outside: float32 again


#: Largest relative errors allowed against float64 for well-separated (random) neurons: a few
#: times the operand rounding (2^-11, 2^-8), as the pair terms' errors mostly cancel in the mean.
VALUE_RTOL = {"tf32": 2e-3, "bfloat16": 2e-2}


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("precision", ["tf32", "bfloat16"])
def test_energy_with_reduced_operands_stays_near_the_float64_formula(precision: str, half_space: bool) -> None:
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(2))
    leaf = w.clone().requires_grad_()
    value = hyperspherical_energy(leaf, half_space=half_space, precision=precision)  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(value, leaf)
    ref_leaf = w.double().requires_grad_()
    ref = pairwise_energy(ref_leaf, 2.0, half_space)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf)
    exact_leaf = w.clone().requires_grad_()
    (exact_grad,) = torch.autograd.grad(hyperspherical_energy(exact_leaf, half_space=half_space), exact_leaf)
    assert _relative_error(value.detach(), ref.detach()) < VALUE_RTOL[precision]
    assert _relative_error(grad, ref_grad) < 5 * VALUE_RTOL[precision]
    assert not torch.equal(grad, exact_grad)  # the option reached the products


def test_float64_neurons_ignore_the_option() -> None:
    w = torch.randn(40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert hyperspherical_energy(w, precision="bfloat16") == hyperspherical_energy(w)


def test_the_option_reaches_the_products_from_a_rule_and_compressive_energy() -> None:
    w = torch.randn(64, 72, generator=torch.Generator().manual_seed(4))
    rule = Rule("mhe", options={"half_space": True, "precision": "bfloat16"})
    regularizer = rule.build_regularizer()
    assert isinstance(regularizer, MHE) and regularizer.precision == "bfloat16"
    assert regularizer(w) == hyperspherical_energy(w, half_space=True, precision="bfloat16")
    projections = torch.randn(3, 8, 72, generator=torch.Generator().manual_seed(5))
    reduced = compressive_energy(w, projections, precision="tf32")
    assert reduced != compressive_energy(w, projections)
    torch.testing.assert_close(reduced, compressive_energy(w, projections), rtol=VALUE_RTOL["tf32"], atol=0)
    assert CoMHE(precision="tf32").precision == "tf32"


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        hyperspherical_energy(torch.randn(4, 3), precision="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        MHE(precision="fp16")  # type: ignore[arg-type]
