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
    assert symmetric_block_rows(2048, None) == 128
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
