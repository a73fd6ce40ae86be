"""Hypothesis strategies and the catalogue of penalties and metrics the property tests run over."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor

from lightning_hsu.functional import (
    compressive_energy,
    gram_determinant_penalty,
    hyperspherical_energy,
    hyperspherical_separation,
    pole_covering_distance,
    pole_energy,
    relaxed_polarization,
    soft_hyperspherical_separation,
    uniformity,
)

NONFINITE = (float("nan"), float("inf"), float("-inf"))
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def pole_for(d: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A fixed N(0, 1) pole of dimension ``d`` (seeded by ``d``)."""
    return torch.randn(d, generator=torch.Generator().manual_seed(d), dtype=torch.float64).to(dtype)


def projections_for(d: int, dtype: torch.dtype = torch.float32, count: int = 3, dim: int = 4) -> Tensor:
    """Fixed Gaussian projections ``[count, dim, d]`` (seeded by ``d``)."""
    g = torch.Generator().manual_seed(1000 + d)
    return torch.randn(count, dim, d, generator=g, dtype=torch.float64).to(dtype)


@dataclass(frozen=True)
class Penalty:
    """A penalty of ``[n, d]`` neurons. ``call(w, rotation)``: ``rotation`` (``[d, d]`` or ``None``)
    is applied to the auxiliary inputs (pole, projections) so that rotating the neurons and them
    together must leave the value unchanged."""

    name: str
    call: Callable[[Tensor, Tensor | None], Tensor]
    chunked: bool = False  # takes chunk_size
    sign_invariant: bool = False  # half-space: flipping a neuron's sign changes nothing


def _rot(x: Tensor, rotation: Tensor | None) -> Tensor:
    return x if rotation is None else x.to(rotation.dtype) @ rotation


def _pole(w: Tensor, rotation: Tensor | None) -> Tensor:
    return _rot(pole_for(w.shape[1], torch.float64 if w.dtype == torch.float64 else torch.float32), rotation)


def _proj(w: Tensor, rotation: Tensor | None) -> Tensor:
    return _rot(projections_for(w.shape[1], torch.float64 if w.dtype == torch.float64 else torch.float32), rotation)


def _energy(**kw):
    return lambda w, r, chunk_size=None: hyperspherical_energy(w, chunk_size=chunk_size, **kw)


PENALTIES: tuple[Penalty, ...] = (
    Penalty("mhe_s2", _energy(power=2.0), chunked=True),
    Penalty("mhe_s1_half", _energy(power=1.0, half_space=True), chunked=True, sign_invariant=True),
    Penalty("mhe_log_half", _energy(power=0.0, half_space=True), chunked=True, sign_invariant=True),
    Penalty("mhe_a0", _energy(power=0.0, distance="angular"), chunked=True),
    Penalty("mhe_a2_half", _energy(power=2.0, distance="angular", half_space=True), chunked=True, sign_invariant=True),
    Penalty("mhs", lambda w, r, chunk_size=None: hyperspherical_separation(w, chunk_size=chunk_size), chunked=True),
    Penalty(
        "mhs_half",
        lambda w, r, chunk_size=None: hyperspherical_separation(w, half_space=True, chunk_size=chunk_size),
        chunked=True,
        sign_invariant=True,
    ),
    Penalty(
        "soft_mhs_half",
        lambda w, r, chunk_size=None: soft_hyperspherical_separation(w, half_space=True, chunk_size=chunk_size),
        chunked=True,
        sign_invariant=True,
    ),
    Penalty("mhp", lambda w, r: pole_energy(w, _pole(w, r))),
    Penalty("mhp_half", lambda w, r: pole_energy(w, _pole(w, r), half_space=True), sign_invariant=True),
    Penalty("mhc", lambda w, r: pole_covering_distance(w, _pole(w, r))),
    Penalty("mhc_half", lambda w, r: pole_covering_distance(w, _pole(w, r), half_space=True), sign_invariant=True),
    Penalty("rmhp", lambda w, r: relaxed_polarization(w)),
    Penalty("mgd", lambda w, r: gram_determinant_penalty(w)),
    Penalty("mgd_half", lambda w, r: gram_determinant_penalty(w, half_space=True), sign_invariant=True),
    Penalty(
        "comhe_half",
        lambda w, r, chunk_size=None: compressive_energy(w, _proj(w, r), half_space=True, chunk_size=chunk_size),
        chunked=True,
        sign_invariant=True,
    ),
    Penalty("uniformity", lambda w, r, chunk_size=None: uniformity(w, chunk_size=chunk_size), chunked=True),
    Penalty(
        "uniformity_half",
        lambda w, r, chunk_size=None: uniformity(w, half_space=True, chunk_size=chunk_size),
        chunked=True,
        sign_invariant=True,
    ),
)

PENALTY_IDS = [p.name for p in PENALTIES]


@st.composite
def neuron_matrices(
    draw: st.DrawFn,
    *,
    max_n: int = 300,
    max_d: int = 300,
    min_log_scale: float = -20.0,
    max_log_scale: float = 20.0,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    min_n: int = 1,
) -> Tensor:
    """``[n, d]`` weights: Gaussian rows at a random overall scale (10^-20 .. 10^20), optionally
    spread over four decades row by row, with zero, repeated and antipodal rows planted; drawn in
    float64 and cast, so a cast to fp16/bf16 may overflow to inf (a non-finite input) or flush
    tiny rows to zero (zero rows)."""
    n = draw(st.one_of(st.integers(min_n, max(min_n, 12)), st.integers(min_n, max_n)), label="n")
    d = draw(st.one_of(st.integers(1, 12), st.integers(1, max_d)), label="d")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    # the extremes (and the fp16/bf16 overflow boundary) are drawn on purpose, not left to luck
    edges = [v for v in (-20.0, -8.0, 0.0, 5.0, 19.5, 20.0) if min_log_scale <= v <= max_log_scale]
    log_scale = draw(
        st.one_of(st.sampled_from(edges), st.floats(min_log_scale, max_log_scale)) if edges else st.floats(0, 0),
        label="log10 scale",
    )
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=torch.float64) * 10.0**log_scale
    if draw(st.booleans(), label="rows over four decades"):
        w = w * 10.0 ** (4.0 * torch.rand(n, 1, generator=g, dtype=torch.float64) - 2.0)
    plants = draw(
        st.lists(
            st.tuples(st.sampled_from(("zero", "repeat", "antipodal")), st.integers(0, n - 1), st.integers(0, n - 1)),
            max_size=4,
        ),
        label="planted rows",
    )
    for kind, i, j in plants:
        if kind == "zero":
            w[i] = 0.0
        elif kind == "repeat":
            w[i] = w[j]
        else:
            w[i] = -w[j]
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    return w.to(dtype)


@st.composite
def nonfinite_matrices(draw: st.DrawFn, *, max_n: int = 40, max_d: int = 40) -> Tensor:
    """Weights as :func:`neuron_matrices` (moderate scale) with NaN, +inf or -inf entries planted."""
    w = draw(neuron_matrices(max_n=max_n, max_d=max_d, min_log_scale=-3, max_log_scale=3))
    n, d = w.shape
    entries = draw(
        st.lists(
            st.tuples(st.integers(0, n - 1), st.integers(0, d - 1), st.sampled_from(NONFINITE)),
            min_size=1,
            max_size=3,
        ),
        label="non-finite entries",
    )
    w = w.clone()
    for i, j, value in entries:
        w[i, j] = value
    return w


def random_rotation(d: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """A Haar-ish random orthogonal ``[d, d]`` matrix (QR of a Gaussian matrix, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.to(dtype)
