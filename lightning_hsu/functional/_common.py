"""Shared numerics of the functional core: dtype promotion, autocast guard, normalisation.

Every regulariser and metric in `lightning_hsu.functional` computes in float32 or better,
whatever the dtype of the weights (bf16/fp16 under AMP), and with autocast switched off, so a
penalty evaluated inside ``training_step`` under ``precision="16-mixed"`` has the same value as in
fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

#: The official code's normaliser, ``w / sqrt(||w||^2 + 1e-4)``: a zero neuron stays finite.
DEFAULT_EPS = 1e-4

_P = ParamSpec("_P")
_R = TypeVar("_R")


class NonFiniteInputError(ValueError):
    """Neurons (or a pole, or projections) contain NaN or inf: every penalty of them is undefined."""


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """Return float64 for float64 input and float32 for everything else (bf16, fp16, fp32)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def full_precision(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with autocast disabled on every device type.

    A penalty evaluated inside a forward hook runs inside Lightning's autocast context; without
    this guard the Gram product would silently run in bf16/fp16.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with torch.autocast("cpu", enabled=False):
            if torch.cuda.is_available():
                with torch.autocast("cuda", enabled=False):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

    return wrapper


def check_neurons(neurons: Tensor, what: str = "neurons", *, check_finite: bool = True) -> Tensor:
    """Validate a ``[n, d]`` or ``[batch, n, d]`` floating tensor and promote it to float32+.

    ``check_finite=False`` skips the NaN/inf check (a device sync) for callers that check later,
    as `row_normalization` does from the squared norms it needs anyway.
    """
    if not isinstance(neurons, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(neurons).__name__}")
    if neurons.dim() not in (2, 3):
        raise ValueError(
            f"{what} must have shape [n, d] or [batch, n, d] (rows are neurons), got shape {tuple(neurons.shape)}"
        )
    if not neurons.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {neurons.dtype}")
    if neurons.shape[-1] == 0:
        raise ValueError(f"{what} have dimension d = 0: shape {tuple(neurons.shape)}")
    if check_finite:
        check_finite_neurons(neurons, what)
    return neurons.to(compute_dtype(neurons))


def check_finite_neurons(neurons: Tensor, what: str = "neurons") -> None:
    """Raise `NonFiniteInputError` if ``neurons`` hold a NaN or inf (one device sync).

    A finite sum proves every entry finite (a NaN or inf entry makes any sum NaN or inf) in one
    reduction, against several elementwise passes and a mask for ``isfinite(x).all()``; only a
    sum that is not finite (a bad entry, or finite entries whose sum overflows) is checked entry
    by entry.
    """
    detached = neurons.detach()
    if bool(torch.isfinite(detached.sum(dtype=compute_dtype(detached)))):  # fp16 sums overflow at 65504
        return
    if not bool(torch.isfinite(detached).all()):
        raise NonFiniteInputError(
            f"{what} contain NaN or inf entries (shape {tuple(neurons.shape)}); "
            "a hyperspherical penalty of non-finite weights is undefined"
        )


def normalize_neurons(neurons: Tensor, eps: float = DEFAULT_EPS, *, host_sync: bool = True) -> Tensor:
    r"""Project neurons onto the unit sphere as the official code does.

    \(\hat w_i = w_i / \sqrt{\lVert w_i\rVert^2 + \epsilon}\) (Liu et al., NeurIPS 2018,
    ``wy1iu/MHE``): with \(\epsilon > 0\) a zero neuron maps to the origin instead of NaN, and
    \(\lVert \hat w_i\rVert < 1\) by a relative \(\epsilon/\lVert w_i\rVert^2\).

    Rows so large that squaring would overflow (max entry above ``finfo.max ** 0.25``) are first
    divided by their largest absolute entry \(s\), and \(\epsilon\) by \(s^2\): the
    same \(\hat w_i\) without overflow (for such rows \(\epsilon/s^2\) is negligible, not
    \(\epsilon\) applied to a row of norm ~1). Tiny rows need no care: their squares
    underflow to zero and they map to (near) the origin, as in the official code.

    Whether any row needs the rescaling is decided on the host (one device sync); with
    ``host_sync=False`` every row is divided by its divisor (1 for all but huge rows), which
    gives the same values with no sync, at the cost of one more pass.
    """
    huge = torch.finfo(neurons.dtype).max ** 0.25
    scale = neurons.detach().abs().amax(dim=-1, keepdim=True)
    too_large = scale > huge
    if not host_sync or bool(too_large.any()):
        divisor = torch.where(too_large, scale, torch.ones_like(scale))
        neurons = neurons / divisor
        return neurons * torch.rsqrt((neurons * neurons).sum(dim=-1, keepdim=True) + eps / (divisor * divisor))
    return neurons * torch.rsqrt((neurons * neurons).sum(dim=-1, keepdim=True) + eps)


@torch.no_grad()
def row_normalization(
    neurons: Tensor, eps: float, what: str = "neurons", *, check_finite: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    r"""The factors of `normalize_neurons`, without autograd and without forming the unit rows.

    Returns ``(rows, r, sq_unit, divisor)`` with the unit neurons \(\hat w = r\,w/s\) equal to
    ``rows * r``: ``rows`` is ``neurons`` itself in the common case where no row needs rescaling
    (``divisor`` is then ``None``, \(s = 1\)), else the rows divided by their divisors
    \(s\); ``r`` the ``[..., n, 1]`` factors \((\lVert w/s\rVert^2 + \epsilon/s^2)^{-1/2}\);
    ``sq_unit`` the squared norms \(\lVert\hat w\rVert^2\) (``[..., n]``). The same values as
    `normalize_neurons`: the squared norms decide, in one check (one host sync), whether any
    row is non-finite (raises `NonFiniteInputError`) or large enough for the rescaling (its
    threshold halved for rounding); only then does the exact check and rescaling run. Leaving the
    product to the caller lets it fold ``r`` into a Gram matrix instead of a pass over ``[n, d]``.

    ``check_finite=False`` makes no host sync and no decision on the data, so that the caller can
    be captured in a CUDA graph: every row is divided by its divisor (two more passes over
    ``[n, d]``), and a NaN or inf row is not reported but makes ``r`` and ``sq_unit`` NaN, hence
    any penalty of them NaN, for the caller to check once for many layers.
    """
    huge = torch.finfo(neurons.dtype).max ** 0.25
    if not check_finite:
        scale = neurons.abs().amax(dim=-1, keepdim=True)  # NaN for a NaN row, inf for an inf row
        divisor = torch.where(scale > huge, scale, 1.0)
        neurons = neurons / divisor  # an inf row becomes NaN (inf / inf)
        sq = torch.linalg.vector_norm(neurons, dim=-1, keepdim=True).square_()
        r = torch.rsqrt(sq + eps / (divisor * divisor))
        return neurons, r, (sq * r * r).squeeze(-1), divisor
    # a fused reduction: vecdot would form the [n, d] products first
    sq = torch.linalg.vector_norm(neurons, dim=-1, keepdim=True).square_()
    rescale: Tensor | None = None
    if not bool((sq <= 0.5 * huge * huge).all()):  # also True for NaN and inf
        check_finite_neurons(neurons, what)
        scale = neurons.abs().amax(dim=-1, keepdim=True)
        rescale = torch.where(scale > huge, scale, torch.ones_like(scale))
        neurons = neurons / rescale
        sq = torch.linalg.vector_norm(neurons, dim=-1, keepdim=True).square_()
    r = torch.rsqrt(sq + eps) if rescale is None else torch.rsqrt(sq + eps / (rescale * rescale))
    return neurons, r, (sq * r * r).squeeze(-1), rescale


def as_batched(neurons: Tensor) -> tuple[Tensor, bool]:
    """Return ``[batch, n, d]`` and whether a batch dimension was added."""
    if neurons.dim() == 2:
        return neurons.unsqueeze(0), True
    return neurons, False
