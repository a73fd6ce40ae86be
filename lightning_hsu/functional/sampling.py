r"""Sampled hyperspherical energy for layers too large to sum over every pair.

Face-recognition classifiers have \(10^5\)–\(10^6\) class vectors; the exact MHE costs
\(O(n^2 d)\) per step. The literature regularises a subset instead: the class vectors of the
classes present in the mini-batch (e.g. the "inter-class" regularisers of Duan et al., *UniformFace*,
CVPR 2019, and Zhao et al., *RegularFace*, CVPR 2019), or a random subset.

**Unbiasedness.** Let \(S\) be a uniformly random subset of \(m\) of the \(n\)
neurons, drawn without replacement. Every pair \(\{i,j\}\) lies in \(S\) with the same
probability, so the mean over the pairs of \(S\) is an unbiased estimate of the mean over all
pairs (a U-statistic of order 2, Hoeffding 1948):

\[
\mathbb{E}_S\Big[\tfrac{1}{\binom m2}\sum_{i<j\in S} f(c_{ij})\Big]
= \tfrac{1}{\binom n2}\sum_{i<j} f(c_{ij}) = E_s,
\]

for the value and, by linearity, for its gradient. Its standard deviation falls like
\(1/\sqrt m\) (about \(2\sigma_1/\sqrt m\), \(\sigma_1^2\) the variance of the
per-neuron mean kernel); average ``draws`` independent estimates and use their spread for an error
bar (`sampled_hyperspherical_energy` returns it with ``return_stderr=True``).

In **half-space** the \(n(2n-1)\) pairs of \(\{\pm\hat w_i\}\) are of two kinds, the
\(n\) antipodal pairs \((i,-i)\) and the \(2n(n-1)\) others, and a subset holds them in
a different proportion (\(1/(2m-1)\) vs \(1/(2n-1)\) antipodal): the plain subset mean
would be biased. Each kind is therefore averaged separately over the subset and the two means are
recombined with the full set's weights.

The estimate over the **classes in the batch** (`subset_hyperspherical_energy`) is exact
for those classes but is unbiased for the whole layer only if the classes in a batch are a uniform
random subset (balanced sampling); frequent classes are otherwise over-weighted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_hsu.functional._common import DEFAULT_EPS, check_neurons, full_precision, normalize_neurons
from lightning_hsu.functional.energy import Distance
from lightning_hsu.functional.kernels import PairKernel, energy_kernel
from lightning_hsu.functional.pairwise import pairwise_kernel_sum
from lightning_hsu.validation import int_at_least, positive_int


def subset_pair_mean(
    unit: Tensor, n_total: int, kernel: PairKernel, *, half_space: bool = False, chunk_size: int | None = None
) -> Tensor:
    r"""Unbiased estimate of the mean of ``kernel`` over the pairs of ``n_total`` neurons, from the pairs
    of a uniformly random subset of them (``unit``, ``[m, d]``, normalised).

    Full space: the mean over the \(m(m-1)/2\) pairs of the subset (a U-statistic, Hoeffding 1948).
    Half space: the \(n\) antipodal pairs \((i, -i)\) and the \(2n(n-1)\) others of
    \(\{\pm\hat w_i\}\) are averaged separately over the subset and recombined with the full set's
    weights, \(\frac{n\,\bar f_{anti} + 2n(n-1)\,\bar f_{other}}{n(2n-1)}\) (the plain subset mean
    would weigh the antipodal pairs \(1/(2m-1)\) instead of \(1/(2n-1)\)). ``m == n_total`` gives
    the exact mean. Differentiable with respect to ``unit``.
    """
    m = unit.shape[0]
    batch = unit.unsqueeze(0)
    total = pairwise_kernel_sum(batch, kernel, half_space=half_space, chunk_size=chunk_size)[0]
    if not half_space:
        return total / (m * (m - 1) / 2)
    anti, _ = kernel(-(unit * unit).sum(-1), False)  # the antipodal pairs (i, -i)
    anti_sum = anti.sum()
    cross_mean = (total - anti_sum) / (2 * m * (m - 1))
    anti_mean = anti_sum / m
    # recombine with the weights of the full set: n antipodal pairs, 2n(n-1) others
    n = n_total
    return (n * anti_mean + 2 * n * (n - 1) * cross_mean) / (n * (2 * n - 1))


def _subset_mean(
    unit: Tensor, n_total: int, power: float, distance: Distance, half_space: bool, chunk_size: int | None
) -> Tensor:
    """Unbiased estimate of the mean pair energy of ``n_total`` neurons from the ``[m, d]`` subset ``unit``."""
    return subset_pair_mean(unit, n_total, energy_kernel(power, distance), half_space=half_space, chunk_size=chunk_size)


@full_precision
def subset_hyperspherical_energy(
    neurons: Tensor,
    indices: Tensor,
    *,
    power: float = 2.0,
    distance: Distance = "euclidean",
    half_space: bool = False,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
) -> Tensor:
    r"""MHE of the neurons ``neurons[indices]`` as an estimate for the whole layer.

    Meant for the classes present in a batch: ``indices`` may repeat (labels) and are reduced to
    the distinct ones. Only the selected rows are read, and only they get a gradient. Unbiased for
    the layer's \(E_s\) when the distinct indices are a uniformly random subset (see the
    module docstring); in half-space the antipodal and the other pairs are reweighted to the
    layer's proportions.

    Args:
        neurons: ``[n, d]``; rows are neurons (e.g. the class vectors of a classifier).
        indices: integer tensor of row indices.
        power, distance, half_space, eps, chunk_size: as in
            `hyperspherical_energy`.

    Returns:
        A scalar; 0 when fewer than two distinct indices are given.
    """
    x = check_neurons(neurons)
    if x.dim() != 2:
        raise ValueError(f"neurons must have shape [n, d], got {tuple(x.shape)}")
    if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex():
        raise TypeError("indices must be an integer tensor of row indices")
    n = x.shape[0]
    chosen = torch.unique(indices.reshape(-1).to(device=x.device, dtype=torch.long))
    if chosen.numel() and (int(chosen[0]) < 0 or int(chosen[-1]) >= n):
        raise IndexError(f"indices must lie in [0, {n}), got range [{int(chosen[0])}, {int(chosen[-1])}]")
    if chosen.numel() < 2:
        return x.sum() * 0.0
    unit = normalize_neurons(x.index_select(0, chosen), eps)
    return _subset_mean(unit, n, power, distance, half_space, chunk_size)


@full_precision
def sampled_hyperspherical_energy(
    neurons: Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
    draws: int = 1,
    power: float = 2.0,
    distance: Distance = "euclidean",
    half_space: bool = False,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
    return_stderr: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Unbiased estimate of the MHE \(E_s\) from uniformly random subsets of neurons.

    Each draw picks ``num_samples`` distinct rows uniformly at random (``torch.randperm`` on
    ``generator``, so a seeded generator gives a reproducible estimate) and computes the mean pair
    energy of the subset (half-space reweighted, see the module docstring); the ``draws`` estimates
    are averaged. Cost \(O(\text{draws}\cdot m^2 d)\) instead of \(O(n^2 d)\).

    Args:
        neurons: ``[n, d]``; rows are neurons.
        num_samples: subset size \(m\), ``2 <= m``; ``m >= n`` gives the exact value.
        generator: source of randomness (CPU generator; indices are moved to the weight's device).
        draws: independent subsets averaged.
        return_stderr: also return the standard error of the mean of the draws
            (\(s/\sqrt{\text{draws}}\), detached; ``nan`` for one draw).

    Returns:
        The estimate (a scalar, differentiable: its gradient is an unbiased estimate of the
        gradient of \(E_s\)), and the standard error if asked.
    """
    x = check_neurons(neurons)
    if x.dim() != 2:
        raise ValueError(f"neurons must have shape [n, d], got {tuple(x.shape)}")
    int_at_least("sampled_hyperspherical_energy", "num_samples", num_samples, 2)  # one pair at least
    positive_int("sampled_hyperspherical_energy", "draws", draws)
    n = x.shape[0]
    m = min(num_samples, n)
    estimates = []
    for _ in range(draws):
        chosen = torch.randperm(n, generator=generator)[:m].to(x.device)
        if m < 2:
            estimates.append(x.sum() * 0.0)
            continue
        unit = normalize_neurons(x.index_select(0, chosen), eps)
        estimates.append(_subset_mean(unit, n, power, distance, half_space, chunk_size))
    stacked = torch.stack(estimates)
    estimate = stacked.mean()
    if not return_stderr:
        return estimate
    stderr = stacked.detach().std() / math.sqrt(draws) if draws > 1 else stacked.new_tensor(float("nan"))
    return estimate, stderr
