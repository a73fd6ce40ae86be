r"""Hyperspherical polarization: MHP and its relaxation R-MHP (Liu et al., AISTATS 2021).

MHP plays a game with a learnable pole \(v\): the energy at the pole

\[
E(v) = \frac1N\sum_{i} \big(2 - 2\cos(v, \hat w_i)\big)^{-1}
\]

(Riesz s = 2) is minimised by the pole (it seeks the emptiest place on the sphere) and maximised
by the neurons (they move into it): \(\max_W\min_v E(v)\).

R-MHP replaces the game by the closed form \(\lVert\sum_i w_i\rVert_2\) on the
*unnormalised* weights, as the official code does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_hsu.functional._common import (
    DEFAULT_EPS,
    NonFiniteInputError,
    check_neurons,
    full_precision,
    normalize_neurons,
    row_normalization,
)
from lightning_hsu.functional._matmul import passes_on_one_thread
from lightning_hsu.functional.kernels import RieszKernel

#: The pole energy's kernel: \((\max(2-2c, 10^{-6}))^{-1}\) (Riesz s = 2, as MHE's).
_POLE_KERNEL = RieszKernel(2.0)


def _check_pole(pole: Tensor, dim: int, *, check_finite: bool) -> None:
    """A ``[dim]`` pole, with finite entries (``check_finite``: one host sync)."""
    if pole.shape != (dim,):
        raise ValueError(f"pole must have shape [{dim}] to match the neurons, got {tuple(pole.shape)}")
    if check_finite and not bool(torch.isfinite(pole.detach()).all()):
        raise NonFiniteInputError(
            f"pole contains NaN or inf entries (shape {tuple(pole.shape)}); the penalty is undefined"
        )


def pole_cosines(
    neurons: Tensor, pole: Tensor, *, half_space: bool, eps: float = DEFAULT_EPS, normalized: bool = False
) -> Tensor:
    r"""Cosines \(\hat w_i\cdot\hat v\) (and \(-\hat w_i\cdot\hat v\) in half-space).

    Both neurons and pole are normalised with \(\sqrt{\lVert\cdot\rVert^2 + \epsilon}\) as in
    the official ``cal``. ``normalized=True``: ``neurons`` are already
    ``normalize_neurons(check_neurons(neurons), eps)``, and neither they nor the pole are checked
    for NaN/inf: for the pole's inner steps against the same neurons, which then make no host
    sync (a NaN still shows in the result).
    """
    unit = neurons if normalized else normalize_neurons(check_neurons(neurons), eps)
    if unit.dim() != 2:
        raise ValueError(f"pole penalties take neurons of shape [n, d], got {tuple(unit.shape)}")
    _check_pole(pole, unit.shape[1], check_finite=not normalized)
    v = normalize_neurons(pole.to(unit.dtype).unsqueeze(0), eps, host_sync=False)[0]
    cos = unit @ v
    return torch.cat([cos, -cos]) if half_space else cos


@full_precision
def pole_energy(
    neurons: Tensor, pole: Tensor, *, half_space: bool = False, eps: float = DEFAULT_EPS, normalized: bool = False
) -> Tensor:
    r"""MHP energy at the pole, \(E(v)=\frac1N\sum_i (\max(2-2c_i, 10^{-6}))^{-1}\).

    \(N = n\) (or \(2n\) in half-space). The neurons' penalty is \(-E(v)\).
    ``normalized``: see `pole_cosines`. For a fixed pole (one that does not require a gradient,
    as the neurons' penalty of `MHP` uses it) the gradient with respect to the neurons is formed
    in closed form in the forward pass (`fixed_pole_penalty`, with `pole_energy_slope`).
    """
    if fixed_pole_of_neurons(neurons, pole, normalized):
        return fixed_pole_penalty(neurons, pole, half_space, eps, _pole_energy_value_and_slope)
    return _pole_energy_value(pole_cosines(neurons, pole, half_space=half_space, eps=eps, normalized=normalized))


def _pole_energy_value(cos: Tensor) -> Tensor:
    value, _ = _POLE_KERNEL(cos, False)
    return value.mean()


def _pole_energy_value_and_slope(cos: Tensor) -> tuple[Tensor, Tensor]:
    return _pole_energy_value(cos), pole_energy_slope(cos)


def fixed_pole_of_neurons(neurons: Tensor, pole: Tensor, normalized: bool) -> bool:
    """Whether a pole objective of raw ``[n, d]`` neurons takes `fixed_pole_penalty` (no pole gradient)."""
    return not normalized and not pole.requires_grad and neurons.dim() == 2


def fixed_pole_penalty(
    neurons: Tensor,
    pole: Tensor,
    half_space: bool,
    eps: float,
    value_and_slope: Callable[[Tensor], tuple[Tensor, Tensor]],
) -> Tensor:
    r"""A pole objective \(f(c)\) of the cosines of `pole_cosines` against a fixed pole, as a
    function of the raw neurons, with its gradient formed in closed form in the forward pass:
    \(\partial f/\partial w_i = r_i\,s_i\,(\hat v - c_i\hat w_i)\), with
    \(s_i = \partial f/\partial c_i\) (\(s_i - s_{i+n}\) in half space) and
    \(r_i = (\lVert w_i\rVert^2+\epsilon)^{-1/2}\): one pass over the neurons instead of an
    autograd graph of the normalisation. ``value_and_slope`` maps the ``[N]`` cosines to
    \((f, \partial f/\partial c)\).
    """
    unit = check_neurons(neurons, check_finite=False)
    _check_pole(pole, unit.shape[1], check_finite=True)
    return cast(Tensor, _FixedPolePenalty.apply(unit, pole.to(unit.dtype), half_space, eps, value_and_slope))


class _FixedPolePenalty(torch.autograd.Function):
    r"""`fixed_pole_penalty`: the value in the forward, the gradient in the backward from the rows
    and ``[n]`` factors. With the unit rows \(\hat w_i = r_i x_i\) of the rows \(x_i = w_i/t_i\)
    (\(t_i\) the divisor of `row_normalization`, 1 for all but huge rows) and
    \(g_i = \partial f/\partial c_i\), \(\partial f/\partial w_i = (r_i g_i\,\hat v -
    r_i^2 g_i c_i\, x_i) / t_i\): no tensor of the layer's size is formed but the gradient
    itself (``docs/performance.md``, item 42)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        neurons: Tensor,
        pole: Tensor,
        half_space: bool,
        eps: float,
        value_and_slope: Callable[[Tensor], tuple[Tensor, Tensor]],
    ) -> Tensor:
        rows, r, _, divisor = row_normalization(neurons, eps)  # raises for NaN/inf neurons
        r = r[:, 0]
        v = normalize_neurons(pole.unsqueeze(0), eps, host_sync=False)[0]
        cos = (rows @ v).mul_(r)
        value, slope = value_and_slope(torch.cat([cos, -cos]) if half_space else cos)
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            n = cos.shape[0]
            if half_space:
                slope = slope[:n] - slope[n:]
            along_pole = (slope * r).to(rows.dtype)  # [n]: the coefficient of v_hat
            along_rows = along_pole * cos * r  # [n]: that of the rows
            if divisor is not None:  # rows = w / s for rescaled rows: a further 1 / s
                along_pole = along_pole / divisor[:, 0]
                along_rows = along_rows / divisor[:, 0]
            ctx.save_for_backward(rows, v, along_pole, along_rows)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor) -> tuple[Tensor, None, None, None, None]:
        rows, v, along_pole, along_rows = ctx.saved_tensors  # type: ignore[attr-defined]
        # as the pair sums' backward: called directly, not through a regularizer's one_thread_graph,
        # the two [n, d] passes would otherwise split over the pool
        with passes_on_one_thread(rows.device):
            grad = rows * (along_rows * -grad_total).unsqueeze(-1)
            grad.addcmul_((along_pole * grad_total).unsqueeze(-1), v.unsqueeze(0))
        return grad, None, None, None, None


def pole_energy_slope(cos: Tensor) -> Tensor:
    r"""\(\partial E/\partial c_i\) of the pole energy \(E = \frac1N\sum_i k(c_i)\) at the
    ``[N]`` cosines of `pole_cosines`: \(k'(c_i)/N = 2 (2-2c_i)^{-2}/N\), 0 where the
    distance is clamped. For the pole's steps in closed form (no autograd graph per step)."""
    _, slope = _POLE_KERNEL(cos, True)
    assert slope is not None
    return slope / cos.shape[0]


@full_precision
def relaxed_polarization(neurons: Tensor, *, check_finite: bool = True) -> Tensor:
    r"""R-MHP penalty \(\lVert\sum_i w_i\rVert_2\) of the unnormalised neurons (no half-space:
    \(w_i\) and \(-w_i\) would cancel). ``check_finite=False``: no host sync (CUDA-graph
    safe), NaN for NaN/inf neurons instead of raising.

    Examples:
        >>> import torch
        >>> tri = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])  # 120 degrees apart
        >>> from lightning_hsu.functional import relaxed_polarization
        >>> round(float(relaxed_polarization(tri)), 4)  # the three vectors sum to zero
        0.0
    """
    total = check_neurons(neurons, check_finite=check_finite).sum(-2)
    # vector_norm squares its input: above sqrt(finfo.max) (1.8e19 in float32) that overflows to
    # inf although the norm itself is representable. Divide by the (detached) largest entry first.
    scale = total.detach().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.squeeze(-1) * torch.linalg.vector_norm(total / scale, dim=-1)
