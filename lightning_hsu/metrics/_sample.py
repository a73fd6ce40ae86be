r"""A bounded, partition-independent sample of feature rows for torchmetrics metrics.

Pairwise metrics of features (uniformity, energy, angles) cost \(O(N^2)\) in the number of
rows, so an epoch's embeddings cannot all be kept. Each row gets a pseudo-random **key** from a
seeded hash of its float32 bits, and the ``max_samples`` rows with the smallest keys are kept (a
*bottom-k* or priority sample). Why this rather than first-N or a classic reservoir:

- it is a uniform sample without replacement of the distinct rows, like a reservoir sample, so it
  does not favour the start of the epoch as first-N would;
- the key depends only on the row, not on when or where it arrived, so the bottom-k of the union
  of every rank's bottom-k is exactly the bottom-k of all the data: the result under DDP equals the
  single-process result over the same rows, whatever the sharding, order or batch size;
- memory stays at ``max_samples`` rows per process between updates (plus the incoming batch).

Identical rows share a key and are kept or dropped together.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Mersenne prime 2^31 - 1: a product of two residues fits in int64 with room to sum them.
_PRIME = 2_147_483_647


def _coefficients(d: int, seed: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, _PRIME, (2, d), generator=generator, dtype=torch.int64).to(device)


def sample_keys(rows: Tensor, seed: int) -> Tensor:
    """A 62-bit int64 key per row of ``rows`` (``[N, d]``): two seeded linear hashes modulo 2^31-1
    of the rows' float32 bit patterns, so equal rows get equal keys on every process and device."""
    bits = rows.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = bits % _PRIME
    coeff = _coefficients(rows.shape[1], seed, rows.device)
    high = ((bits * coeff[0]) % _PRIME).sum(dim=1) % _PRIME
    low = ((bits * coeff[1]) % _PRIME).sum(dim=1) % _PRIME
    return high * (_PRIME + 1) + low


def bottom_k(rows: Tensor, k: int, seed: int) -> Tensor:
    """The (at most) ``k`` rows with the smallest keys, sorted by key (so the order is canonical)."""
    if rows.shape[0] == 0:
        return rows
    order = torch.argsort(sample_keys(rows, seed), stable=True)
    return rows[order[:k]]
