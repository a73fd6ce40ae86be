"""The search for the closest pair (hard MHS, the uniformity's shift) and what hard MHS allocates.

`largest_pair_cosine` is checked against the maximum over an explicit list of the pairs' cosines
in float64; hard MHS's step against a count of the tensors as large as the neurons that the
profiler sees allocated: only the gradient itself.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lightning_hsu.functional as F
from lightning_hsu.functional.pairwise import cosine_blocks, largest_pair_cosine


def _largest_cosine_by_enumeration(unit: torch.Tensor, half_space: bool) -> float:
    """max over i != j of c_ij, and in half space of -c_ij and of the antipodal -|u_i|^2 too."""
    rows = [u.double() for u in unit]
    candidates = []
    for i, j in itertools.permutations(range(len(rows)), 2):
        c = float(rows[i] @ rows[j])
        candidates += [c, -c] if half_space else [c]
    if half_space:
        candidates += [-float(u @ u) for u in rows]
    return max(candidates)


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7])
def test_largest_pair_cosine_is_the_maximum_over_the_enumerated_pairs(half_space: bool, chunk_size: int | None) -> None:
    g = torch.Generator().manual_seed(3)
    unit = torch.nn.functional.normalize(torch.randn(2, 9, 5, generator=g, dtype=torch.float64), dim=-1)
    unit[1, 4] = -unit[1, 6]  # an antipodal pair: the largest in half space (|c| = 1), not in full space
    got = largest_pair_cosine(cosine_blocks(unit, chunk_size), half_space=half_space)
    expected = torch.tensor([_largest_cosine_by_enumeration(m, half_space) for m in unit], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_largest_pair_cosine_leaves_a_given_gram_matrix_unchanged() -> None:
    g = torch.Generator().manual_seed(4)
    unit = torch.nn.functional.normalize(torch.randn(1, 6, 4, generator=g), dim=-1)
    gram = unit @ unit.mT
    before = gram.clone()
    largest_pair_cosine([(0, gram)], half_space=True)
    assert torch.equal(gram, before)


@pytest.mark.parametrize("half_space", [False, True])
def test_hard_mhs_step_allocates_no_neurons_sized_tensor_but_the_gradient(half_space: bool) -> None:
    # The unit rows, a gradient kept from forward and its scaled copy were one [n, d] tensor each:
    # on a busy core their page faults cost more than their passes (docs/performance.md, item 42).
    w = torch.randn(64, 300, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        F.hyperspherical_separation(w, half_space=half_space).backward()
    sized = [e.name for e in prof.events() if e.self_cpu_memory_usage >= w.numel() * w.element_size()]
    assert len(sized) == 1, sized
    assert w.grad is not None and w.grad.count_nonzero() > 0
