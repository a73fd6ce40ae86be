"""Pure-PyTorch hyperspherical-uniformity regularisers and metrics (no Lightning import).

Every function takes neurons as the rows of ``[n, d]`` (see `neurons_of`), computes in
float32 or better with autocast off, and is differentiable.
"""

from lightning_hsu.functional._common import DEFAULT_EPS, NonFiniteInputError, normalize_neurons
from lightning_hsu.functional.compressive import compressive_energy, gaussian_projections
from lightning_hsu.functional.covering import pole_covering_distance
from lightning_hsu.functional.energy import hyperspherical_energy
from lightning_hsu.functional.gram_determinant import gram_determinant_penalty
from lightning_hsu.functional.neurons import neuron_count, neurons_of
from lightning_hsu.functional.pairwise import pairwise_kernel_sum
from lightning_hsu.functional.polarization import pole_energy, relaxed_polarization
from lightning_hsu.functional.separation import hyperspherical_separation, soft_hyperspherical_separation
from lightning_hsu.functional.uniformity import uniformity

__all__ = [
    "DEFAULT_EPS",
    "NonFiniteInputError",
    "compressive_energy",
    "gaussian_projections",
    "gram_determinant_penalty",
    "hyperspherical_energy",
    "hyperspherical_separation",
    "neuron_count",
    "neurons_of",
    "normalize_neurons",
    "pairwise_kernel_sum",
    "pole_covering_distance",
    "pole_energy",
    "relaxed_polarization",
    "soft_hyperspherical_separation",
    "uniformity",
]

from lightning_hsu.functional.diversity import (
    DIVERSITY_METRICS,
    coherence,
    diversity_profile,
    diversity_summary,
    effective_rank,
    gram_condition_number,
    mean_nearest_angle,
    mean_pairwise_angle,
    minimum_angle,
    near_duplicate_count,
    pairwise_angle_histogram,
    pairwise_angle_quantiles,
    sample_neuron_indices,
)

__all__ += [
    "DIVERSITY_METRICS",
    "coherence",
    "diversity_profile",
    "diversity_summary",
    "effective_rank",
    "gram_condition_number",
    "mean_nearest_angle",
    "mean_pairwise_angle",
    "minimum_angle",
    "near_duplicate_count",
    "pairwise_angle_histogram",
    "pairwise_angle_quantiles",
    "sample_neuron_indices",
]
