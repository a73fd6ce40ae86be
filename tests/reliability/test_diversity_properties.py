"""Property-based tests of the diversity metrics (``lightning_hsu.functional.diversity``).

Their documented contract differs from the penalties' on purpose: for fewer than two neurons the
angle metrics and the coherence are NaN, the condition number is ``inf`` for linearly dependent
neurons and NaN (with the effective rank) when every neuron is zero. Everything else is finite and
in its range, NaN/inf weights raise ``ValueError``, and the metrics are invariant to permuting,
rotating and (positively) rescaling the neurons.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_hsu.functional import diversity as D
from reliability.strategies import neuron_matrices, nonfinite_matrices, random_rotation

PROPERTY = settings.get_profile("reliability")
ANGLES = ("min_angle", "mean_nn_angle", "mean_angle", "angle_p5", "angle_p50", "angle_p95")


def _summary(w: torch.Tensor, half_space: bool, chunk_size: int | None = None) -> dict[str, float]:
    return D.diversity_summary(w, half_space=half_space, chunk_size=chunk_size)


@settings(PROPERTY)
@given(w=neuron_matrices(max_n=200, max_d=200), half_space=st.booleans())
def test_diversity_metrics_are_in_range_or_refuse_nonfinite_weights(w, half_space):
    if not bool(torch.isfinite(w).all()):  # an fp16/bf16 cast overflowed
        with pytest.raises(ValueError, match="NaN or inf"):
            _summary(w, half_space)
        return
    n, d = w.shape
    m = _summary(w, half_space)
    top = 90.0 if half_space else 180.0
    for key in ANGLES:
        if n < 2:
            assert math.isnan(m[key]), key
        else:
            assert 0.0 <= m[key] <= top + 1e-9, (key, m[key])
    if n >= 2:
        assert 0.0 <= m["coherence"] <= 1.0 + 1e-6
        assert m["min_angle"] <= m["mean_nn_angle"] + 1e-9
    assert 0 <= m["duplicates"] <= n and float(m["duplicates"]).is_integer()
    assert math.isfinite(m["energy"]) and math.isfinite(m["uniformity"])
    directions = D._directions(w)
    if bool((directions.norm(dim=1) == 0).all()):  # every neuron zero (or flushed to zero by the cast)
        assert math.isnan(m["effective_rank"]) and math.isnan(m["condition_number"])
    else:
        assert 1.0 - 1e-6 <= m["effective_rank"] <= min(n, d) + 1e-6
        assert m["condition_number"] >= 1.0 - 1e-6  # inf allowed: dependent neurons


@settings(PROPERTY, max_examples=10)
@given(w=nonfinite_matrices())
def test_diversity_metrics_refuse_nan_or_inf_weights(w):
    for fn in (
        D.minimum_angle,
        D.mean_nearest_angle,
        D.mean_pairwise_angle,
        D.coherence,
        D.near_duplicate_count,
        D.pairwise_angle_histogram,
        D.pairwise_angle_quantiles,
        D.gram_spectrum,
        D.effective_rank,
        D.gram_condition_number,
        D.diversity_summary,
    ):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(w)
            pytest.fail(fn.__name__)


def _assert_same_metrics(a: dict[str, float], b: dict[str, float], what: str) -> None:
    for key in a:
        if key in ("condition_number", "duplicates"):
            continue  # a cliff (rank tolerance, angle threshold): rounding may cross it
        if key.startswith("angle_p"):
            tol = 2 * D.QUANTILE_RESOLUTION  # read off a fine histogram: a bin's width
        elif key in ("energy", "uniformity", "effective_rank", "coherence"):
            tol = 1e-6 * max(1.0, abs(a[key]))
        else:
            tol = 1e-4  # degrees; arccos near 0 turns 1e-16 in a cosine into ~1e-6 degrees
        assert (math.isnan(a[key]) and math.isnan(b[key])) or abs(a[key] - b[key]) <= tol, (what, key, a[key], b[key])


MODERATE = dict(max_n=60, max_d=30, min_log_scale=-3.0, max_log_scale=3.0, dtypes=(torch.float64,))


@settings(PROPERTY, max_examples=PROPERTY.max_examples // 2)
@given(w=neuron_matrices(**MODERATE), seed=st.integers(0, 2**31 - 1), half_space=st.booleans())
def test_diversity_metrics_are_invariant_to_permutation_rotation_and_chunking(w, seed, half_space):
    g = torch.Generator().manual_seed(seed)
    base = _summary(w, half_space)
    perm = torch.randperm(w.shape[0], generator=g)
    _assert_same_metrics(base, _summary(w[perm], half_space), "permutation")
    _assert_same_metrics(base, _summary(w @ random_rotation(w.shape[1], seed), half_space), "rotation")
    chunk = int(torch.randint(1, w.shape[0] + 2, (1,), generator=g))
    _assert_same_metrics(base, _summary(w, half_space, chunk_size=chunk), f"chunk_size={chunk}")


@settings(PROPERTY, max_examples=PROPERTY.max_examples // 2)
@given(w=neuron_matrices(**MODERATE), seed=st.integers(0, 2**31 - 1), half_space=st.booleans())
def test_angle_metrics_ignore_the_length_of_each_neuron(w, seed, half_space):
    """Angles use exact directions: rescaling a row by 10^-3 .. 10^3 changes no angle."""
    g = torch.Generator().manual_seed(seed)
    scales = 10.0 ** (6.0 * torch.rand(w.shape[0], 1, generator=g, dtype=torch.float64) - 3.0)
    a = D.angle_statistics(w, half_space=half_space)
    b = D.angle_statistics(w * scales, half_space=half_space)
    for key in ("min_angle", "mean_nn_angle", "mean_angle", "coherence"):
        x, y = getattr(a, key), getattr(b, key)
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-4, (key, x, y)
