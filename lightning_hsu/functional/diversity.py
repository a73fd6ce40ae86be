r"""Diversity metrics of a layer's neurons: angles, coherence, energy, spectrum, duplicates.

The numbers worth watching while a network trains with (or without) hyperspherical-uniformity
regularisation (Liu et al., *Learning towards Minimum Hyperspherical Energy*, NeurIPS 2018;
Liu et al., *Learning with Hyperspherical Uniformity*, AISTATS 2021; Wang & Isola, ICML 2020).
For neurons \(w_i\) (rows of ``[n, d]``) with directions \(u_i = w_i/\lVert w_i\rVert\)
and cosines \(c_{ij} = u_i\cdot u_j\):

- angle \(\theta_{ij} = \arccos c_{ij}\) in degrees; in **half-space** the angle between the
  *lines* spanned by two neurons, \(\min(\theta_{ij}, 180^\circ-\theta_{ij}) = \arccos|c_{ij}|\),
  because a neuron and its negation compute the same feature up to sign;
- minimum angle \(\min_{i<j}\theta_{ij}\) (the Tammes objective, what MHS maximises);
- mean nearest-neighbour angle \(\frac1n\sum_i \min_{j\ne i}\theta_{ij}\);
- mean pairwise angle \(\frac{1}{n(n-1)/2}\sum_{i<j}\theta_{ij}\);
- coherence \(\mu = \max_{i\ne j}|c_{ij}|\) (the same in both spaces);
- near-duplicates: the number of neurons whose nearest-neighbour angle is below a threshold;
- the histogram and quantiles of the \(n(n-1)/2\) pairwise angles;
- the spectrum of the Gram matrix \(G = UU^\top\): effective rank
  \(\exp(-\sum_k p_k\log p_k)\), \(p_k = \lambda_k/\sum_l\lambda_l\) (Roy & Vetterli,
  *The effective rank*, EUSIPCO 2007) and condition number \(\lambda_{max}/\lambda_{min}\);
- the hyperspherical energy and the uniformity, by `hyperspherical_energy`
  and `uniformity` with the regularisers' conventions.

Angles use the exact directions (a second normalisation after the official
\(w/\sqrt{\lVert w\rVert^2+10^{-4}}\), whose norm below 1 would bias every angle of
small neurons); a zero neuron has no direction and counts as orthogonal to every other (cosine 0).
Cosines are clamped to \([-1, 1]\) before ``arccos``. Everything runs without gradient in
float32 or better, and pairs are visited in row blocks (`
block_rows_for`): extra memory \(O(\text{block}\cdot n)\), never \(O(n^2)\) for large ``n``.
For fewer than two neurons the angle metrics and the coherence are NaN, the count is 0.

## Huge layers: a sampled profile

An exact profile costs \(O(n^2 d)\) time (minutes for a 50,000 × 512 layer: docs/performance.md).
With `max_neurons=m`, a layer of \(n > m\) neurons is profiled
on \(m\) of its neurons drawn uniformly at random without replacement (`torch.randperm` on a
generator seeded with `seed`, see `sample_neuron_indices`: the same neurons at every call, so a
logged curve follows one subset through training): \(O(m^2 d)\) time and \(O(m^2)\) memory for
the pairs, whatever \(n\) (seconds for that layer, the exact spectrum included). The
profile says so (`DiversityProfile.sampled`, `neurons_used`). What each metric of the subset says
about the whole layer:

- **Unbiased estimates.** Every pair of the layer lies in the subset with the same probability, so
  a mean over the subset's \(m(m-1)/2\) pairs is an unbiased estimate of the mean over the layer's
  (a U-statistic, Hoeffding 1948), whose standard error falls like \(1/\sqrt m\) (Hoeffding's bound
  for independent draws is \(\sigma\sqrt{2/m}\), \(\sigma\) the spread of the layer's pair
  values): `mean_angle`; each histogram bin's share of the pairs (the
  histogram counts the subset's pairs: `pairs` is \(m(m-1)/2\)); `energy`, the mean pair energy
  (Liu et al., NeurIPS 2018), with the half-space antipodal and other pairs reweighted to the
  layer's proportions as in `lightning_hsu.functional.sampling`.
- **Consistent, slightly biased.** `uniformity` is the log of the subset's mean Gaussian kernel
  (Wang & Isola, ICML 2020): the mean inside the log is unbiased, the log makes the value slightly
  low on average (Jensen), by \(O(1/m)\). The quantiles `angle_p<q>` are those of the subset's
  pairs: their error shrinks like \(1/\sqrt m\).
- **Bounds only.** Extremes are not estimable from a subset. `min_angle` is an *upper* bound
  (\(\ge\) the layer's), equal to it only if both ends of the closest pair were drawn, which has
  probability \(\frac{m(m-1)}{n(n-1)}\) (0.7% for 4,096 of 50,000): a lone near-duplicate pair is
  usually missed. `coherence` is a *lower* bound for the same reason. `duplicates` counts the drawn
  neurons with a duplicate among the drawn ones: each is a true near-duplicate, most are missed, a
  *lower* bound. `mean_nn_angle` *overestimates*: a drawn neuron's nearest neighbour in the subset
  is at least as far as its nearest neighbour in the layer.
- **Exact.** `effective_rank` and `condition_number` come from the \(d\times d\) frame operator
  \(U^\top U\) of all \(n\) neurons when \(d \le m\) (\(O(nd^2)\) time, \(O(d^2)\) memory); only
  when \(d > m\) too are they those of the subset's Gram matrix.

`max_neurons=None` (the default of the functions here) is exact always.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_hsu.functional._common import DEFAULT_EPS, check_neurons, full_precision, normalize_neurons
from lightning_hsu.functional.energy import hyperspherical_energy
from lightning_hsu.functional.kernels import GaussianKernel, energy_kernel
from lightning_hsu.functional.pairwise import block_rows_for
from lightning_hsu.functional.sampling import subset_pair_mean
from lightning_hsu.functional.uniformity import gaussian_shift, gaussian_shift_needed, uniformity
from lightning_hsu.validation import int_at_least, number_in

#: Width in degrees of the fine bins behind `pairwise_angle_quantiles`: a quantile is
#: exact to it (0.01°) while memory stays \(O(180/0.01)\) whatever ``n``.
QUANTILE_RESOLUTION = 0.01

DiversityMetric = Literal[
    "min_angle",
    "mean_nn_angle",
    "mean_angle",
    "coherence",
    "duplicates",
    "energy",
    "uniformity",
    "effective_rank",
    "condition_number",
]

#: The scalar metrics `diversity_summary` can return (quantiles come on top, as ``angle_p<q>``).
DIVERSITY_METRICS: tuple[str, ...] = get_args(DiversityMetric)

_DEFAULT_QUANTILES = (0.05, 0.5, 0.95)

#: The `max_neurons` of `NeuronDiversityMonitor` and `python -m lightning_hsu.report`: a layer with
#: more neurons is profiled on this many of them, drawn at random (see "Huge layers" above). A
#: profile of 4,096 neurons takes about as long as the exact one of a 4,096-neuron layer.
DEFAULT_MAX_NEURONS = 4096
#: Rows of the directions converted to float64 at a time when the spectrum is taken from the
#: \(d\times d\) frame operator: memory \(O(\text{block}\cdot d + d^2)\) besides the directions.
_SPECTRUM_BLOCK_ROWS = 4096
#: Rows per strip of the pairwise angles in `angle_statistics`: a strip of 4,096 columns is 4 MiB
#: of float32, whose elementwise passes run from cache.
_PAIR_STRIP_ROWS = 256


def _directions(neurons: Tensor) -> Tensor:
    """Exact unit directions of the rows of ``[n, d]`` (zero rows stay zero)."""
    x = check_neurons(neurons)
    if x.dim() != 2:
        raise ValueError(f"neurons must have shape [n, d] (rows are neurons), got shape {tuple(x.shape)}")
    # The official normaliser first (it rescales overflowing rows), then the exact one: its output
    # has norm in (0, 1], so the second division neither overflows nor underflows.
    v = normalize_neurons(x)
    return v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _max_angle(half_space: bool) -> float:
    return 90.0 if half_space else 180.0


def _default_edges(bins: int | Tensor | Sequence[float], half_space: bool, dtype: torch.dtype) -> Tensor:
    if isinstance(bins, bool):
        raise TypeError(f"bins must be an int or a sequence of edges in degrees, got {bins!r}")
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        return torch.linspace(0.0, _max_angle(half_space), bins + 1, dtype=dtype)
    edges = torch.as_tensor(bins, dtype=dtype).flatten()
    if edges.numel() < 2 or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError("bin edges must be a strictly increasing sequence of at least 2 angles in degrees")
    return edges


def _check_quantiles(quantiles: Sequence[float]) -> tuple[float, ...]:
    qs = tuple(float(q) for q in quantiles)
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantiles must lie in [0, 1], got {q}")
    return qs


@dataclass
class AngleStatistics:
    """What one blockwise pass over the pairs of neurons collects (angles in degrees).

    ``nearest`` holds each neuron's nearest-neighbour angle; ``histogram`` the counts of the
    \\(n(n-1)/2\\) pairwise angles over ``edges`` (each bin ``[e_k, e_{k+1})``, the last one closed,
    angles outside the edges not counted, as ``numpy.histogram``); ``angle_sum`` and
    ``angle_sq_sum`` the sums of the pairwise angles and of their squares; ``fine`` the counts over
    bins of width `QUANTILE_RESOLUTION` used for quantiles.
    """

    n: int
    half_space: bool
    nearest: Tensor
    coherence: float
    pairs: int
    angle_sum: float
    angle_sq_sum: float
    edges: Tensor
    histogram: Tensor
    fine: Tensor = field(repr=False)
    fine_sum: Tensor = field(repr=False)

    @property
    def min_angle(self) -> float:
        return float(self.nearest.min()) if self.n >= 2 else math.nan

    @property
    def max_angle(self) -> float:
        """Largest pairwise angle, read off the fine histogram (exact to `QUANTILE_RESOLUTION`)."""
        if self.pairs == 0:
            return math.nan
        last = int(self.fine.nonzero()[-1])
        return min((last + 1) * QUANTILE_RESOLUTION, _max_angle(self.half_space))

    @property
    def mean_nn_angle(self) -> float:
        return float(self.nearest.mean()) if self.n >= 2 else math.nan

    @property
    def mean_angle(self) -> float:
        return self.angle_sum / self.pairs if self.pairs else math.nan

    def duplicates(self, threshold: float) -> int:
        """Neurons whose nearest neighbour is closer than ``threshold`` degrees."""
        return int((self.nearest < threshold).sum()) if self.n >= 2 else 0

    def quantiles(self, quantiles: Sequence[float]) -> list[float]:
        r"""Quantiles of the pairwise angles with ``numpy``'s default (linear) interpolation.

        The \(k\)-th smallest angle is taken as the mean of the angles in its fine bin, so each
        value is within `QUANTILE_RESOLUTION` of the exact quantile, and exact when the bin
        holds a single distinct angle (a regular configuration).
        """
        qs = _check_quantiles(quantiles)
        if self.pairs == 0:
            return [math.nan for _ in qs]
        cum = torch.cumsum(self.fine, 0)

        def order_statistic(k: int) -> float:
            index = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype), right=True))
            return float(self.fine_sum[index] / self.fine[index])

        out = []
        for q in qs:
            h = q * (self.pairs - 1)
            lo = math.floor(h)
            hi = min(lo + 1, self.pairs - 1)
            a, b = order_statistic(lo), order_statistic(hi)
            out.append(a + (h - lo) * (b - a))
        return out


@full_precision
@torch.no_grad()
def angle_statistics(
    neurons: Tensor,
    *,
    half_space: bool = False,
    bins: int | Tensor | Sequence[float] = 18,
    chunk_size: int | None = None,
) -> AngleStatistics:
    """Collect every angle-based metric of ``neurons`` (``[n, d]``) in one blockwise pass.

    Args:
        neurons: rows are neurons; any float dtype (computed in float32, float64 stays float64).
        half_space: angles between lines, \\(\\arccos|c_{ij}|\\) in \\([0^\\circ, 90^\\circ]\\).
        bins: number of equal bins over \\([0, 180]\\) (\\([0, 90]\\) in half-space), or the
            bin edges in degrees.
        chunk_size: rows per block (``None``: dense up to 4096 neurons, then blocks).
    """
    unit = _directions(neurons)
    n = unit.shape[0]
    edges = _default_edges(bins, half_space, unit.dtype)
    top = _max_angle(half_space)
    fine_bins = round(top / QUANTILE_RESOLUTION)
    device = unit.device
    # Accumulated on the device, read once at the end (no sync per block on a GPU).
    histogram = torch.zeros(edges.numel() - 1, dtype=torch.int64, device=device)
    fine = torch.zeros(fine_bins, dtype=torch.int64, device=device)
    fine_sum = torch.zeros(fine_bins, dtype=torch.float64, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # of the angles and of their squares
    nearest = unit.new_zeros(n)
    coherence = -math.inf
    rows_per_block = block_rows_for(n, chunk_size)
    edges_dev = edges.to(device)
    tile_upper = torch.ones(_PAIR_STRIP_ROWS, _PAIR_STRIP_ROWS, dtype=torch.bool, device=device).triu_(1)

    def accumulate(cosines: Tensor) -> None:
        angles = torch.rad2deg_(torch.arccos(cosines)).reshape(-1)
        wide = angles.double()
        sums[0] += wide.sum()
        sums[1] += (wide * wide).sum()
        histogram.add_(_bin_counts(angles, edges_dev))
        fine_index = (angles / QUANTILE_RESOLUTION).long().clamp_(0, fine_bins - 1)
        fine.add_(torch.bincount(fine_index, minlength=fine_bins))
        fine_sum.index_add_(0, fine_index, wide)

    for start in range(0, n, rows_per_block):
        stop = min(start + rows_per_block, n)
        cos = (unit[start:stop] @ unit.T).clamp_(-1.0, 1.0)
        magnitude = cos.abs()
        self_pairs = torch.diagonal(magnitude[:, start:stop])
        self_pairs.fill_(-1.0)  # below every |c|: the self pairs drop out of the maxima
        coherence = max(coherence, float(magnitude.amax()))
        if half_space:
            closeness = magnitude
        else:
            torch.diagonal(cos[:, start:stop]).fill_(-2.0)
            closeness = cos
        # arccos is decreasing: the nearest neighbour has the largest (|)cosine(|).
        nearest[start:stop] = torch.rad2deg(torch.arccos(closeness.amax(1).clamp(-1.0, 1.0)))
        pair_cos = magnitude if half_space else cos
        # The pairs i < j of the block's rows, in strips of rows: the strip's own square through a
        # triangular mask, the columns right of it whole (no mask over the block, and the
        # elementwise passes run on cache-sized pieces).
        for first in range(0, stop - start, _PAIR_STRIP_ROWS):
            last = min(first + _PAIR_STRIP_ROWS, stop - start)
            size = last - first
            if size > 1:
                accumulate(pair_cos[first:last, start + first : start + last][tile_upper[:size, :size]])
            if start + last < n:
                accumulate(pair_cos[first:last, start + last :])
    angle_sum, angle_sq_sum = sums.tolist()
    histogram, fine, fine_sum = histogram.cpu(), fine.cpu(), fine_sum.cpu()
    return AngleStatistics(
        n=n,
        half_space=half_space,
        nearest=nearest.cpu(),
        coherence=coherence if n >= 2 else math.nan,
        pairs=n * (n - 1) // 2,
        angle_sum=angle_sum,
        angle_sq_sum=angle_sq_sum,
        edges=edges.cpu(),
        histogram=histogram,
        fine=fine,
        fine_sum=fine_sum,
    )


def _bin_counts(values: Tensor, edges: Tensor) -> Tensor:
    """``numpy.histogram`` counts: bins ``[e_k, e_{k+1})``, the last closed, outsiders dropped."""
    bins = edges.numel() - 1
    # bucketize(right=True) gives 0 below the first edge and bins + 1 above the last; the last
    # edge itself belongs to the last bin. Outsiders are counted in the two extra slots, dropped.
    index = torch.bucketize(values, edges.to(values.dtype), right=True)
    index.masked_fill_(values == edges[-1], bins)
    return torch.bincount(index, minlength=bins + 2)[1 : bins + 1]


def minimum_angle(neurons: Tensor, *, half_space: bool = False, chunk_size: int | None = None) -> Tensor:
    r"""Smallest pairwise angle \(\min_{i<j}\theta_{ij}\) in degrees (the Tammes objective).

    Liu et al., AISTATS 2021 (MHS maximises it). In half-space the angle between lines,
    \(\arccos|c_{ij}|\). NaN for fewer than two neurons.
    """
    stats = angle_statistics(neurons, half_space=half_space, bins=1, chunk_size=chunk_size)
    return torch.tensor(stats.min_angle, dtype=stats.nearest.dtype)


def mean_nearest_angle(neurons: Tensor, *, half_space: bool = False, chunk_size: int | None = None) -> Tensor:
    r"""Mean nearest-neighbour angle \(\frac1n\sum_i\min_{j\ne i}\theta_{ij}\) in degrees."""
    stats = angle_statistics(neurons, half_space=half_space, bins=1, chunk_size=chunk_size)
    return torch.tensor(stats.mean_nn_angle, dtype=stats.nearest.dtype)


def mean_pairwise_angle(neurons: Tensor, *, half_space: bool = False, chunk_size: int | None = None) -> Tensor:
    r"""Mean pairwise angle \(\frac{2}{n(n-1)}\sum_{i<j}\theta_{ij}\) in degrees."""
    stats = angle_statistics(neurons, half_space=half_space, bins=1, chunk_size=chunk_size)
    return torch.tensor(stats.mean_angle, dtype=stats.nearest.dtype)


def coherence(neurons: Tensor, *, chunk_size: int | None = None) -> Tensor:
    r"""Mutual coherence \(\mu = \max_{i\ne j}|c_{ij}|\) (1 for a duplicated or negated neuron).

    Lower is more diverse; \(\mu \ge \sqrt{(n-d)/(d(n-1))}\) (Welch bound). NaN for n < 2.
    """
    stats = angle_statistics(neurons, bins=1, chunk_size=chunk_size)
    return torch.tensor(stats.coherence, dtype=stats.nearest.dtype)


def near_duplicate_count(
    neurons: Tensor, *, threshold: float = 1.0, half_space: bool = False, chunk_size: int | None = None
) -> Tensor:
    """Number of neurons whose nearest-neighbour angle is below ``threshold`` degrees.

    A pair of duplicates counts 2, a triple 3. In half-space a neuron close to the *negation* of
    another also counts (it spans almost the same line).
    """
    _check_threshold(threshold)
    stats = angle_statistics(neurons, half_space=half_space, bins=1, chunk_size=chunk_size)
    return torch.tensor(stats.duplicates(threshold), dtype=torch.int64)


def pairwise_angle_histogram(
    neurons: Tensor,
    *,
    bins: int | Tensor | Sequence[float] = 18,
    half_space: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Counts of the \\(n(n-1)/2\\) pairwise angles (degrees) and the bin edges.

    ``bins`` equal bins over \\([0, 180]\\) (\\([0, 90]\\) in half-space) or explicit edges;
    binning follows ``numpy.histogram`` (``[e_k, e_{k+1})``, the last bin closed).
    """
    stats = angle_statistics(neurons, half_space=half_space, bins=bins, chunk_size=chunk_size)
    return stats.histogram, stats.edges


def pairwise_angle_quantiles(
    neurons: Tensor,
    quantiles: Sequence[float] = _DEFAULT_QUANTILES,
    *,
    half_space: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Quantiles of the pairwise angles (degrees), exact to `QUANTILE_RESOLUTION`.

    Computed from a fine histogram rather than by sorting the \\(n(n-1)/2\\) angles, so memory
    stays bounded for large layers; interpolation as ``numpy.quantile``'s default.
    """
    qs = _check_quantiles(quantiles)
    stats = angle_statistics(neurons, half_space=half_space, bins=1, chunk_size=chunk_size)
    return torch.tensor(stats.quantiles(qs), dtype=stats.nearest.dtype)


@full_precision
@torch.no_grad()
def gram_spectrum(neurons: Tensor) -> Tensor:
    r"""The \(\min(n, d)\) largest eigenvalues of the Gram matrix \(G = UU^\top\) of the directions.

    The nonzero eigenvalues of \(UU^\top\) (\(n\times n\)) and \(U^\top U\)
    (\(d\times d\)) coincide, so the smaller one is decomposed, in float64: memory
    \(O(\min(n,d)^2)\). Descending, clamped at 0.
    """
    unit = _directions(neurons)
    n, d = unit.shape
    if n <= d:
        wide = unit.double()
        gram = wide @ wide.T
    else:  # the frame operator, summed over blocks of rows: no float64 copy of all n rows
        gram = torch.zeros(d, d, dtype=torch.float64, device=unit.device)
        for start in range(0, n, _SPECTRUM_BLOCK_ROWS):
            block = unit[start : start + _SPECTRUM_BLOCK_ROWS].double()
            gram.addmm_(block.T, block)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)


def _rank_tolerance(neurons: Tensor, spectrum: Tensor) -> float:
    # numpy.linalg.matrix_rank's rule on singular values, sigma <= sigma_max * max(n, d) * eps, on
    # the eigenvalues sigma^2, with eps of the dtype the directions were computed in.
    eps = torch.finfo(torch.float64 if neurons.dtype == torch.float64 else torch.float32).eps
    return float(spectrum[0]) * (max(neurons.shape[-2:]) * eps) ** 2


def effective_rank(neurons: Tensor) -> Tensor:
    r"""Entropy effective rank of the Gram matrix (Roy & Vetterli, EUSIPCO 2007).

    \(\operatorname{erank} = \exp\big(-\sum_k p_k \log p_k\big)\),
    \(p_k = \lambda_k/\sum_l \lambda_l\) over the eigenvalues of \(G = UU^\top\): between 1
    (all neurons on one line) and \(\min(n, d)\) (a tight frame, e.g. orthonormal neurons).
    A regular simplex of \(n\) neurons gives \(n - 1\).
    """
    return _effective_rank_of(gram_spectrum(neurons))


def _effective_rank_of(spectrum: Tensor) -> Tensor:
    total = spectrum.sum()
    if float(total) == 0.0:
        return torch.tensor(math.nan, dtype=torch.float64)
    p = spectrum / total
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


def gram_condition_number(neurons: Tensor) -> Tensor:
    r"""Condition number \(\lambda_{max}/\lambda_{min}\) of the Gram matrix on its \(\min(n,d)\) eigenvalues.

    For \(n \le d\) that is \(UU^\top\) itself; for \(n > d\) (where \(UU^\top\) is
    singular) it is the frame operator \(U^\top U\), 1 for a tight frame such as the
    cross-polytope. Equal to \((\sigma_{max}/\sigma_{min})^2\) of \(U\). ``inf`` when the
    neurons are linearly dependent (e.g. a regular simplex of \(n \le d\) neurons), judged with
    the tolerance of ``numpy.linalg.matrix_rank``.
    """
    return _condition_number_of(gram_spectrum(neurons), neurons)


def _condition_number_of(spectrum: Tensor, neurons: Tensor) -> Tensor:
    lo, hi = float(spectrum[-1]), float(spectrum[0])
    if hi == 0.0:
        return torch.tensor(math.nan, dtype=torch.float64)
    if lo <= _rank_tolerance(neurons, spectrum):
        return torch.tensor(math.inf, dtype=torch.float64)
    return torch.tensor(hi / lo, dtype=torch.float64)


def _check_threshold(threshold: float) -> None:
    number_in("diversity", "duplicate_threshold", threshold, 0.0, 180.0)  # an angle in degrees


def _quantile_key(q: float) -> str:
    return f"angle_p{100.0 * q:g}".replace(".", "_")


def sample_neuron_indices(n: int, m: int, seed: int = 0) -> Tensor:
    """The neurons a sampled profile uses: `m` of `range(n)`, uniformly at random without
    replacement, in ascending order (int64, on the CPU).

    `torch.randperm(n)` on a CPU generator seeded with `seed`, first `m` kept: the same `n`, `m`
    and `seed` give the same neurons on every machine and at every call.
    """
    for name, value in (("n", n), ("m", m), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= m <= n:
        raise ValueError(f"need 0 <= m <= n, got m={m}, n={n}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:m].sort().values


def _check_max_neurons(max_neurons: int | None) -> None:
    if max_neurons is not None:  # None: exact; else at least one pair
        int_at_least("diversity", "max_neurons", max_neurons, 2)


@dataclass
class DiversityProfile:
    """The result of `diversity_profile`: scalar `metrics` plus the angle histogram.

    `neurons` is the layer's number of neurons \\(n\\), `neurons_used` how many were profiled: fewer
    when the layer was sampled (`max_neurons`); then the histogram counts the
    \\(m(m-1)/2\\) pairs of the subset and each metric means what the module docstring's table says.
    """

    metrics: dict[str, float]
    histogram: Tensor
    edges: Tensor
    pairs: int
    angle_sum: float
    angle_sq_sum: float
    min_angle: float
    max_angle: float
    neurons: int
    neurons_used: int

    @property
    def sampled(self) -> bool:
        """Whether the metrics come from a random subset of the neurons (`neurons_used < neurons`)."""
        return self.neurons_used < self.neurons


@full_precision
@torch.no_grad()
def _sampled_energy(
    subset: Tensor,
    n: int,
    power: float,
    distance: Literal["euclidean", "angular"],
    half_space: bool,
    chunk_size: int | None,
) -> float:
    unit = normalize_neurons(check_neurons(subset), DEFAULT_EPS)
    kernel = energy_kernel(power, distance)
    return float(subset_pair_mean(unit, n, kernel, half_space=half_space, chunk_size=chunk_size))


@full_precision
@torch.no_grad()
def _sampled_uniformity(subset: Tensor, n: int, t: float, half_space: bool, chunk_size: int | None) -> float:
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"t must be a finite number > 0, got {t!r}")
    unit = normalize_neurons(check_neurons(subset), DEFAULT_EPS)
    shift = 0.0
    if gaussian_shift_needed(t, unit.dtype):  # the largest kernel value sets it (any constant would do)
        shift = float(gaussian_shift(unit.unsqueeze(0), t, half_space=half_space, chunk_size=chunk_size)[0])
    mean = subset_pair_mean(unit, n, GaussianKernel(float(t), shift), half_space=half_space, chunk_size=chunk_size)
    return shift + math.log(float(mean))


def diversity_profile(
    neurons: Tensor,
    *,
    metrics: Sequence[str] | None = None,
    half_space: bool = False,
    duplicate_threshold: float = 1.0,
    quantiles: Sequence[float] = _DEFAULT_QUANTILES,
    bins: int | Tensor | Sequence[float] = 18,
    power: float = 2.0,
    distance: Literal["euclidean", "angular"] = "euclidean",
    t: float = 2.0,
    chunk_size: int | None = None,
    max_neurons: int | None = None,
    seed: int = 0,
) -> DiversityProfile:
    """`diversity_summary` plus the pairwise-angle histogram, from one pass over the pairs.

    The histogram's `pairs`, `angle_sum`, `angle_sq_sum`, `min_angle` and `max_angle` are what
    TensorBoard's raw histograms need.

    `max_neurons`: profile a layer of more neurons on this many of them, drawn uniformly at random
    with `seed` (`sample_neuron_indices`); `None` (default): exact always. The profile's `sampled`
    and `neurons_used` say whether it happened; which metrics are then unbiased estimates and which
    are only bounds is in the module docstring ("Huge layers").
    """
    wanted = tuple(DIVERSITY_METRICS if metrics is None else metrics)
    unknown = [m for m in wanted if m not in DIVERSITY_METRICS]
    if unknown:
        raise ValueError(f"unknown diversity metric(s) {unknown}; choose from {list(DIVERSITY_METRICS)}")
    _check_threshold(duplicate_threshold)
    _check_max_neurons(max_neurons)
    qs = _check_quantiles(quantiles)
    if isinstance(neurons, Tensor) and neurons.dim() != 2:
        raise ValueError(f"neurons must have shape [n, d] (rows are neurons), got shape {tuple(neurons.shape)}")
    n = int(neurons.shape[0])
    used = neurons.detach()
    if max_neurons is not None and n > max_neurons:
        used = used.index_select(0, sample_neuron_indices(n, max_neurons, seed).to(used.device))
    sampled = used.shape[0] < n
    stats = angle_statistics(used, half_space=half_space, bins=bins, chunk_size=chunk_size)
    values: dict[str, float] = {}
    spectrum = None
    if {"effective_rank", "condition_number"} & set(wanted):
        # Exact from all rows whenever its matrix is small (min(n, d) <= max_neurons): see the table.
        exact_spectrum = not sampled or int(neurons.shape[1]) <= int(used.shape[0])
        spectrum_of = neurons.detach() if exact_spectrum else used
        spectrum = gram_spectrum(spectrum_of)
    for name in wanted:
        if name == "min_angle":
            values[name] = stats.min_angle
        elif name == "mean_nn_angle":
            values[name] = stats.mean_nn_angle
        elif name == "mean_angle":
            values[name] = stats.mean_angle
        elif name == "coherence":
            values[name] = stats.coherence
        elif name == "duplicates":
            values[name] = float(stats.duplicates(duplicate_threshold))
        elif name == "energy":
            if sampled:
                values[name] = _sampled_energy(used, n, power, distance, half_space, chunk_size)
            else:
                energy = hyperspherical_energy(
                    used, power=power, distance=distance, half_space=half_space, chunk_size=chunk_size
                )
                values[name] = float(energy)
        elif name == "uniformity":
            if sampled:
                values[name] = _sampled_uniformity(used, n, t, half_space, chunk_size)
            else:
                values[name] = float(uniformity(used, t=t, half_space=half_space, chunk_size=chunk_size))
        elif name == "effective_rank":
            assert spectrum is not None
            values[name] = float(_effective_rank_of(spectrum))
        elif name == "condition_number":
            assert spectrum is not None
            values[name] = float(_condition_number_of(spectrum, spectrum_of))
    for q, value in zip(qs, stats.quantiles(qs), strict=True):
        values[_quantile_key(q)] = value
    return DiversityProfile(
        metrics=values,
        histogram=stats.histogram,
        edges=stats.edges,
        pairs=stats.pairs,
        angle_sum=stats.angle_sum,
        angle_sq_sum=stats.angle_sq_sum,
        min_angle=stats.min_angle,
        max_angle=stats.max_angle,
        neurons=n,
        neurons_used=int(used.shape[0]),
    )


def diversity_summary(
    neurons: Tensor,
    *,
    metrics: Sequence[str] | None = None,
    half_space: bool = False,
    duplicate_threshold: float = 1.0,
    quantiles: Sequence[float] = _DEFAULT_QUANTILES,
    power: float = 2.0,
    distance: Literal["euclidean", "angular"] = "euclidean",
    t: float = 2.0,
    chunk_size: int | None = None,
    max_neurons: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Every diversity metric of one layer's neurons (``[n, d]``) as plain floats.

    Keys (see the module docstring for the formulas): ``min_angle``, ``mean_nn_angle``,
    ``mean_angle`` (degrees), ``coherence``, ``duplicates`` (nearest-neighbour angle below
    ``duplicate_threshold`` degrees), ``energy`` (`hyperspherical_energy`
    with ``power``/``distance``; lower is more diverse, Liu et al., NeurIPS 2018), ``uniformity``
    (`uniformity` with ``t``; Wang & Isola, ICML 2020),
    ``effective_rank`` and ``condition_number`` of the Gram matrix, then one ``angle_p<100q>`` per
    quantile (``angle_p5``, ``angle_p50``, ``angle_p95`` by default; ``quantiles=()`` for none).

    Args:
        neurons: ``[n, d]``, rows are neurons (see `neurons_of`).
        metrics: a subset of `DIVERSITY_METRICS` (``None``: all); the energy, uniformity and
            spectrum each cost one more pass, so leaving them out saves time.
        half_space: angles between lines (\\(\\arccos|c|\\)), and the half-space energy and
            uniformity over \\(\\{\\pm w_i\\}\\), as for hidden layers in the papers.
        duplicate_threshold: angle in degrees under which a nearest neighbour is a duplicate.
        quantiles: of the pairwise angles, each in [0, 1].
        power, distance: of the energy, as for the MHE regulariser.
        t: temperature of the uniformity.
        chunk_size: rows per block (``None``: automatic).
        max_neurons: profile a layer of more neurons on a random subset of this many (`None`:
            exact always); see "Huge layers" in the module docstring for what each metric then means.
        seed: of that subset (`sample_neuron_indices`).

    Examples:
        >>> import torch
        >>> tri = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])  # 120 degrees apart
        >>> from lightning_hsu.functional.diversity import diversity_summary
        >>> summary = diversity_summary(tri, metrics=["min_angle", "coherence"], quantiles=())
        >>> {k: round(v, 2) for k, v in summary.items()}
        {'min_angle': 120.0, 'coherence': 0.5}
    """
    return diversity_profile(
        neurons,
        metrics=metrics,
        half_space=half_space,
        duplicate_threshold=duplicate_threshold,
        quantiles=quantiles,
        bins=1,
        power=power,
        distance=distance,
        t=t,
        chunk_size=chunk_size,
        max_neurons=max_neurons,
        seed=seed,
    ).metrics
