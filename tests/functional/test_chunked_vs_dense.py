"""The chunked (block-by-block) path gives the dense path's value and gradient.

The automatic switch happens above ``pairwise.DENSE_BLOCK_ELEMENTS`` Gram entries; the tests
lower that constant (monkeypatch) to cross the threshold at a small, cheap size. A spy on
``torch.bmm`` records the shape of every Gram block formed (``[batch, rows, cols]`` with
``cols <= n < d``, so they cannot be mistaken for the ``[batch, k, d]`` gradient products): the
tests thereby prove that the automatic choice really chunks, without relying on the private
schedule of :mod:`~lightning_hsu.functional.pairwise`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import lightning_hsu.functional as F
from lightning_hsu.functional import pairwise

N, D = 17, 40  # d > projection dim > n: a Gram block [.., rows, <= n] is recognisable
PROJ_DIM = 30
CHUNKS = [1, 7, N - 1, N]

Penalty = Callable[[torch.Tensor, "int | None"], torch.Tensor]
PENALTIES: dict[str, Penalty] = {}
for _half in (False, True):
    _sp = "half" if _half else "full"
    for _p, _dist in ((0.0, "euclidean"), (1.0, "euclidean"), (2.0, "euclidean"), (1.5, "euclidean"),
                      (0.0, "angular"), (1.0, "angular"), (2.0, "angular")):  # fmt: skip
        PENALTIES[f"mhe-{_dist}-{_p}-{_sp}"] = lambda w, c, p=_p, d=_dist, h=_half: F.hyperspherical_energy(
            w, power=p, distance=d, half_space=h, chunk_size=c
        )
    PENALTIES[f"uniformity-{_sp}"] = lambda w, c, h=_half: F.uniformity(w, t=2.0, half_space=h, chunk_size=c)
    PENALTIES[f"mhs-soft-{_sp}"] = lambda w, c, h=_half: F.soft_hyperspherical_separation(
        w, temperature=0.05, half_space=h, chunk_size=c
    )
    PENALTIES[f"mhs-hard-{_sp}"] = lambda w, c, h=_half: F.hyperspherical_separation(w, half_space=h, chunk_size=c)
    PENALTIES[f"comhe-{_sp}"] = lambda w, c, h=_half: F.compressive_energy(
        w,
        torch.randn(3, PROJ_DIM, D, generator=torch.Generator().manual_seed(5), dtype=w.dtype),
        half_space=h,
        chunk_size=c,
    )


def neurons(n: int = N, d: int = D, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    shape = (n, d) if batch is None else (batch, n, d)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def value_and_grad(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = w.clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


@pytest.fixture
def gram_blocks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """``(rows, cols)`` of every Gram block ``torch.bmm`` forms while the test runs."""
    seen: list[tuple[int, int]] = []
    original = torch.bmm

    def recording(a: torch.Tensor, b: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        out = original(a, b, *args, **kwargs)
        if out.shape[-1] <= N:  # a cosine block, not a [.., k, d] gradient product
            seen.append((out.shape[-2], out.shape[-1]))
        return out

    monkeypatch.setattr(torch, "bmm", recording)
    return seen


def test_default_threshold_is_dense_up_to_4096_neurons_and_chunked_above() -> None:
    assert pairwise.DENSE_BLOCK_ELEMENTS == 4096 * 4096
    assert pairwise.block_rows_for(4096, None) == 4096
    rows = pairwise.block_rows_for(4097, None)
    assert 1 <= rows < 4097 and rows * 4097 <= pairwise.DENSE_BLOCK_ELEMENTS
    assert pairwise.block_rows_for(100_000, None) * 100_000 <= pairwise.DENSE_BLOCK_ELEMENTS


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_invalid_chunk_size_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        F.hyperspherical_energy(neurons(), chunk_size=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_automatic_chunking_above_lowered_threshold_equals_dense_value_and_gradient(
    name: str, monkeypatch: pytest.MonkeyPatch, gram_blocks: list[tuple[int, int]]
) -> None:
    fn = PENALTIES[name]
    w = neurons(seed=1)
    dense_value, dense_grad = value_and_grad(lambda x: fn(x, N), w)
    monkeypatch.setattr(pairwise, "DENSE_BLOCK_ELEMENTS", 5 * N)  # at most 5 rows of n per block
    assert pairwise.block_rows_for(N, None) == 5
    gram_blocks.clear()
    auto_value, auto_grad = value_and_grad(lambda x: fn(x, None), w)
    if not name.startswith("mhs-hard"):  # hard MHS scans with `@`, not bmm
        assert gram_blocks, "no Gram block seen: the spy is blind to this path"
        assert max(rows * cols for rows, cols in gram_blocks) <= 5 * N
    torch.testing.assert_close(auto_value, dense_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(auto_grad, dense_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_explicit_chunk_sizes_1_7_n_minus_1_n_equal_dense_value_and_gradient(
    name: str, gram_blocks: list[tuple[int, int]]
) -> None:
    fn = PENALTIES[name]
    w = neurons(seed=2)
    dense_value, dense_grad = value_and_grad(lambda x: fn(x, N), w)
    for chunk in CHUNKS:
        gram_blocks.clear()
        value, grad = value_and_grad(lambda x, c=chunk: fn(x, c), w)
        if not name.startswith("mhs-hard"):
            assert gram_blocks and max(rows for rows, _ in gram_blocks) <= chunk, f"chunk {chunk}"
        torch.testing.assert_close(
            value, dense_value, rtol=1e-12, atol=1e-12, msg=lambda m, c=chunk: f"value, chunk {c}: {m}"
        )
        torch.testing.assert_close(
            grad, dense_grad, rtol=1e-10, atol=1e-12, msg=lambda m, c=chunk: f"gradient, chunk {c}: {m}"
        )


def test_chunk_size_larger_than_n_is_the_dense_path(gram_blocks: list[tuple[int, int]]) -> None:
    w = neurons(seed=3)
    a = F.hyperspherical_energy(w, chunk_size=10 * N)
    assert gram_blocks == [(N, N)]
    torch.testing.assert_close(a, F.hyperspherical_energy(w, chunk_size=N), rtol=0, atol=0)


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 9])
def test_batched_neurons_chunked_equal_dense(half_space: bool, chunk: int) -> None:
    w = neurons(n=9, d=4, seed=4, batch=3)
    fn = lambda c: lambda x: F.hyperspherical_energy(x, power=2.0, half_space=half_space, chunk_size=c)  # noqa: E731
    dense_value, dense_grad = value_and_grad(fn(9), w)
    value, grad = value_and_grad(fn(chunk), w)
    torch.testing.assert_close(value, dense_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12)


def test_hard_mhs_ties_found_across_block_boundaries() -> None:
    # Regular tetrahedron plus its rotated copy: 6 + 6 tied pairs, spread over several blocks.
    t = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    w = torch.cat([t, -t])  # the cube: 12 edges tie at the minimum
    dense_value, dense_grad = value_and_grad(lambda x: F.hyperspherical_separation(x, chunk_size=8), w)
    for chunk in (1, 3, 5, 7):
        value, grad = value_and_grad(lambda x, c=chunk: F.hyperspherical_separation(x, chunk_size=c), w)
        torch.testing.assert_close(value, dense_value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12)
    c = 1.0 / 3.0 / (1.0 + 1e-4 / 3.0)  # ||t_i||^2 = 3
    torch.testing.assert_close(dense_value, torch.tensor(-12.0 * (2.0 - 2.0 * c), dtype=torch.float64))


def test_float32_chunked_equals_dense_on_a_few_hundred_neurons() -> None:
    w = torch.randn(300, 16, generator=torch.Generator().manual_seed(6))
    for half in (False, True):
        fn = lambda c, h=half: lambda x: F.hyperspherical_energy(x, power=2.0, half_space=h, chunk_size=c)  # noqa: E731
        dense_value, dense_grad = value_and_grad(fn(300), w)
        value, grad = value_and_grad(fn(64), w)
        torch.testing.assert_close(value, dense_value, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-9)


def test_gaussian_projections_written_into_a_buffer_are_the_same_draw() -> None:
    from lightning_hsu.functional import gaussian_projections

    fresh = gaussian_projections(7, count=3, dim=2, generator=torch.Generator().manual_seed(9))
    buffer = torch.zeros(3, 2, 7)
    got = gaussian_projections(7, count=3, dim=2, generator=torch.Generator().manual_seed(9), out=buffer)
    assert got is buffer
    torch.testing.assert_close(buffer, fresh, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"out must have shape \(3, 2, 7\)"):
        gaussian_projections(7, count=3, dim=2, out=torch.zeros(3, 7, 2))
