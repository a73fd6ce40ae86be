"""The search for the closest pair (hard MHS, the uniformity's shift), checked against the maximum
over an explicit list of the pairs' cosines in float64."""

from __future__ import annotations

import itertools

import pytest
import torch

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
