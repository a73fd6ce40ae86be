"""How many tensors as large as the neurons a penalty's step allocates, counted by the profiler.

On a busy core the page faults of glibc's heap regrowing for such temporaries cost more than
their passes (``docs/performance.md``, item 42), so the regularisers whose own code lies outside
the pair sums form no more of them than they need.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lightning_hsu.functional as F


def _neurons_sized_allocations(penalty: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> list[int]:
    """Sizes, in units of ``w``'s bytes, of the allocations of at least that size in forward + backward."""
    nbytes = w.numel() * w.element_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        penalty(w).backward()
    return sorted(round(e.self_cpu_memory_usage / nbytes) for e in prof.events() if e.self_cpu_memory_usage >= nbytes)


@pytest.mark.parametrize("half_space", [False, True])
def test_hard_mhs_step_allocates_no_neurons_sized_tensor_but_the_gradient(half_space: bool) -> None:
    # before: the unit rows, a gradient kept from forward, its scaled copy and the batch's stack
    w = torch.randn(64, 300, requires_grad=True)
    sizes = _neurons_sized_allocations(lambda x: F.hyperspherical_separation(x, half_space=half_space), w)
    assert sizes == [1]
    assert w.grad is not None and w.grad.count_nonzero() > 0


@pytest.mark.parametrize("half_space", [False, True])
def test_mgd_step_allocates_only_the_float64_rows_their_product_and_the_gradient(half_space: bool) -> None:
    # before: the normalisation's autograd graph (five), the float64 unit rows, the product, the cast
    w = torch.randn(64, 300, requires_grad=True)
    sizes = _neurons_sized_allocations(lambda x: F.gram_determinant_penalty(x, half_space=half_space), w)
    assert sizes == [1, 2, 2]
    assert w.grad is not None and bool(torch.isfinite(w.grad).all())


@pytest.mark.parametrize("name", ["mhp", "mhc"])
def test_pole_step_allocates_no_neurons_sized_tensor_but_the_gradient(name: str) -> None:
    # before: the pole's steps normalised the neurons first (their absolute values, squares and
    # unit rows), and the penalty formed its gradient in forward and scaled a copy in backward
    from lightning_hsu.regularizers.registry import make_regularizer

    regularizer = make_regularizer(name, half_space=True)
    w = torch.randn(64, 300, requires_grad=True)
    regularizer(w, step=0).backward()  # the pole is created here
    w.grad = None
    sizes = _neurons_sized_allocations(lambda x: regularizer(x, step=1), w)
    assert sizes == [1]
    assert w.grad is not None and bool(torch.isfinite(w.grad).all())
