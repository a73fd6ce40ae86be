"""The sampled MHE is an unbiased estimate within its stated error, seeded and reproducible."""

from __future__ import annotations

import pytest
import torch

from lightning_hsu.functional import hyperspherical_energy
from lightning_hsu.functional.sampling import sampled_hyperspherical_energy, subset_hyperspherical_energy


def _clustered(n: int = 240, d: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[: n // 5] += 2.0  # a cluster, so that the pair energies vary a lot
    return w


@pytest.mark.parametrize("half_space", [False, True])
def test_unbiased_within_stated_error(half_space: bool) -> None:
    w = _clustered()
    exact = hyperspherical_energy(w, half_space=half_space)
    g = torch.Generator().manual_seed(1234)
    estimate, stderr = sampled_hyperspherical_energy(
        w, 16, generator=g, draws=1500, half_space=half_space, return_stderr=True
    )
    assert 0 < float(stderr) < 0.05 * float(exact)
    assert abs(float(estimate - exact)) < 4.0 * float(stderr)


def test_half_space_subset_mean_without_reweighting_would_be_biased() -> None:
    """Documents why the antipodal pairs are reweighted: the naive subset MHE is off by far more."""
    w = _clustered()
    exact = hyperspherical_energy(w, half_space=True)
    g = torch.Generator().manual_seed(5)
    naive = torch.stack(
        [hyperspherical_energy(w[torch.randperm(240, generator=g)[:8]], half_space=True) for _ in range(1500)]
    )
    stderr = naive.std() / 1500**0.5
    assert abs(float(naive.mean() - exact)) > 6.0 * float(stderr)


@pytest.mark.parametrize("half_space", [False, True])
def test_all_neurons_give_the_exact_value_and_gradient(half_space: bool) -> None:
    w = _clustered(50).requires_grad_()
    exact = hyperspherical_energy(w, half_space=half_space)
    (exact_grad,) = torch.autograd.grad(exact, w)
    for estimate in (
        sampled_hyperspherical_energy(w, 50, generator=torch.Generator().manual_seed(0), half_space=half_space),
        subset_hyperspherical_energy(w, torch.arange(49, -1, -1), half_space=half_space),
    ):
        (grad,) = torch.autograd.grad(estimate, w)
        torch.testing.assert_close(estimate, exact)
        torch.testing.assert_close(grad, exact_grad)


def test_seeded_and_reproducible() -> None:
    w = _clustered()
    a = sampled_hyperspherical_energy(w, 20, generator=torch.Generator().manual_seed(7), draws=3)
    b = sampled_hyperspherical_energy(w, 20, generator=torch.Generator().manual_seed(7), draws=3)
    c = sampled_hyperspherical_energy(w, 20, generator=torch.Generator().manual_seed(8), draws=3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batch_classes_repeat_and_only_selected_rows_get_gradient() -> None:
    w = _clustered(30).requires_grad_()
    labels = torch.tensor([3, 7, 3, 12, 7, 7])
    value = subset_hyperspherical_energy(w, labels)
    torch.testing.assert_close(value, hyperspherical_energy(w[[3, 7, 12]]))
    (grad,) = torch.autograd.grad(value, w)
    touched = grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == [3, 7, 12]


def test_degenerate_and_invalid_inputs() -> None:
    w = _clustered(10)
    assert float(subset_hyperspherical_energy(w, torch.tensor([4, 4]))) == 0.0
    with pytest.raises(IndexError):
        subset_hyperspherical_energy(w, torch.tensor([0, 10]))
    with pytest.raises(TypeError):
        subset_hyperspherical_energy(w, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        sampled_hyperspherical_energy(w, 1)
    with pytest.raises(ValueError):
        sampled_hyperspherical_energy(w, 4, draws=0)
    _, stderr = sampled_hyperspherical_energy(w, 4, return_stderr=True)
    assert torch.isnan(stderr)
