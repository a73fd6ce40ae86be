r"""Maximum Gram determinant (MGD): Liu et al., *Learning with Hyperspherical Uniformity*,
AISTATS 2021.

\[
K_{ij} = e^{-d^2_{ij}} + 10^{-6}\,\delta_{ij}, \qquad R = -\log\det K.
\]

A larger determinant means a larger volume spanned by the neurons in the kernel's feature space.
In half-space the official code builds the \(2n\times 2n\) kernel of \(\{\pm\hat w_i\}\);
it has the block form \(\begin{pmatrix}A&B\\B&A\end{pmatrix}\) with \(A = e^{-(2-2C)} +
10^{-6}I\), \(B = e^{-(2+2C)}\), so \(\log\det K = \log\det(A+B) + \log\det(A-B)\): two
\(n\times n\) factorisations instead of one \(2n\times 2n\) (a quarter of the work).

The gradient is formed in closed form from \(\partial \log\det M / \partial M = M^{-1}\)
(one ``cholesky_inverse`` per factor) instead of by autograd through the Cholesky factorisation,
whose backward costs about six times the inverse's \(\tfrac23 n^3\) (two triangular solves
with \(n\) right-hand sides and an \(n^3\) product).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_hsu.functional._common import DEFAULT_EPS, as_batched, check_neurons, full_precision, row_normalization
from lightning_hsu.functional._matmul import (
    batched_matmul,
    chosen_threads,
    gram,
    passes_on_product_threads,
    serial_passes,
)
from lightning_hsu.functional.pairwise import _fold_projection


def _cubic_work(matrix: Tensor) -> int:
    r"""\(n^3\) per matrix of a ``[batch, n, n]`` tensor, times the batch: the size of a factorisation."""
    return matrix.shape[0] * matrix.shape[-1] ** 3


def _cholesky_pd(matrix: Tensor, what: str) -> Tensor:
    """The Cholesky factor of a positive-definite kernel, or a clear error naming it (one host sync)."""
    # LAPACK splits a factorisation between threads as it does a product: all threads or one, measured
    with chosen_threads(_cubic_work(matrix), f"{matrix.dtype} cholesky"):
        factor, info = torch.linalg.cholesky_ex(matrix)
    if bool((info > 0).any()):
        raise ValueError(
            f"the MGD kernel ({what}) is not positive definite even with its 1e-6 jitter; "
            "raise `jitter` or check the weights"
        )
    return factor


def _logdet_of_factor(factor: Tensor) -> Tensor:
    return 2.0 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)


def _neg_logdet_and_coefficients(
    cos: Tensor, half_space: bool, jitter: float, with_grad: bool
) -> tuple[Tensor, Tensor | None]:
    r"""\(R = -\log\det K\) of [batch, n, n] cosines and, with ``with_grad``, \(P = -\tfrac12\partial R/\partial C\).

    Full space, \(K = E^+ + jI\) with \(E^\pm = e^{\pm 2C - 2}\):
    \(P = K^{-1}\circ E^+\). Half space, \(A \pm B = E^+ + jI \pm E^-\):
    \(P = (A+B)^{-1}\circ (E^+ - E^-) + (A-B)^{-1}\circ (E^+ + E^-)\).
    The factor \(-2\) is left to the caller, which scales the rows once (each pass over an
    \(n\times n\) float64 matrix of a large layer is a pass over 8-128 MiB).
    """
    # in place where a matrix is not needed again: each new n x n float64 matrix of a large layer is
    # a fresh mapping whose pages all fault (2048 neurons: 32 MiB each, about 12 ms of faults)
    same = torch.add(cos.new_tensor(-2.0), cos, alpha=2.0).exp_()  # E+ in two passes
    if not half_space:
        kernel = same.clone()
        torch.diagonal(kernel, dim1=-2, dim2=-1).add_(jitter)
        factors = [(_cholesky_pd(kernel, "full space"), same)]
        del kernel
    else:
        opposite = torch.div(cos.new_tensor(math.exp(-4.0)), same)  # E- = e^-4 / E+, one pass instead of three
        plus = same + opposite  # A + B
        torch.diagonal(plus, dim1=-2, dim2=-1).add_(jitter)
        factor_plus = _cholesky_pd(plus, "half space, A + B")
        minus = torch.sub(same, opposite, out=plus)  # A - B, over A + B
        torch.diagonal(minus, dim1=-2, dim2=-1).add_(jitter)
        factor_minus = _cholesky_pd(minus, "half space, A - B")
        factors = [
            (factor_plus, torch.sub(same, opposite, out=minus)),  # E+ - E-, over A - B
            (factor_minus, same.add_(opposite)),  # E+ + E-
        ]
        del opposite
    value = cast(Tensor, -sum(_logdet_of_factor(factor) for factor, _ in factors))
    if not with_grad:
        return value, None
    coefficients: Tensor | None = None
    for factor, kernel_slope in factors:
        with chosen_threads(_cubic_work(factor), f"{factor.dtype} cholesky_inverse"):
            inverse = torch.cholesky_inverse(factor)
        term = kernel_slope.mul_(inverse)
        del inverse
        coefficients = term if coefficients is None else coefficients.add_(term)
    return value, coefficients


class _NegLogDetGaussianKernel(torch.autograd.Function):
    r"""\(-\log\det K\) of the Gaussian kernel of the normalised rows of raw neurons
    ``[batch, n, d]``, per batch entry.

    Computed in float64, the normalisation included: the kernel's smallest eigenvalue may be the
    jitter, and float32 cosines (errors ~1e-7) change \(\log\det\) of near-duplicate neurons by
    0.5% or break its positive definiteness. The gradient is a float64 product for the same
    reason: with near-duplicates the rows of \(D\) cancel to a few digits (in float32 the
    gradient of 512 neurons in \(\mathbb{R}^3\) came out 100% wrong).

    The unit rows \(\hat w = r w\) are never formed: the cosines are the Gram matrix of \(w\)
    scaled by \(r_i r_j\), and with \(g = \partial R/\partial\hat W = 2D\hat W\) the chain
    through the normalisation, \(r_i(g_i - (g_i\cdot\hat w_i)\hat w_i)\), is folded into the
    coefficients (`_fold_projection`), so that the gradient is one product with \(W\) in
    backward. A step then holds the float64 rows and the gradient as its only ``[n, d]``
    tensors (on a busy core the heap's page faults for more of them cost more than their passes,
    ``docs/performance.md`` item 42).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, neurons: Tensor, eps: float, half_space: bool, jitter: float
    ) -> Tensor:
        rows, r, sq_unit, divisor = row_normalization(neurons.to(torch.float64), eps)
        cos = gram(rows)
        with_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        # the n x n float64 passes are few and long: the Gram product's threads halve them when idle
        with passes_on_product_threads():
            cos.mul_(r).mul_(r.mT)
            value, slope = _neg_logdet_and_coefficients(cos, half_space, jitter, with_grad)
            if slope is not None:
                torch.diagonal(cos, dim1=-2, dim2=-1).zero_()  # _fold_projection takes the diagonal from sq_unit
                # g = 2 D Ŵ = -4 P Ŵ; the fold is linear in its coefficients, so -4 joins the column scale
                coefficients = _fold_projection(slope, cos, 0, sq_unit, r)  # rows of the gradient by Ŵ
                coefficients.mul_(r.mT * -4.0)  # ... by W: Ŵ = diag(r) W
                if divisor is not None:
                    coefficients.div_(divisor)
                ctx.save_for_backward(coefficients, rows)
        return value.to(neurons.dtype)

    @staticmethod
    @once_differentiable
    @serial_passes
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_value: Tensor
    ) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None, None, None
        coefficients, rows = ctx.saved_tensors  # type: ignore[attr-defined]
        scale = grad_value.to(torch.float64).reshape(-1, 1, 1)
        grad = batched_matmul(coefficients, rows).mul_(scale)  # scaled as [n, d], not as [n, n]
        return grad.to(grad_value.dtype), None, None, None


@full_precision
@serial_passes
def gram_determinant_penalty(
    neurons: Tensor,
    *,
    half_space: bool = False,
    eps: float = DEFAULT_EPS,
    jitter: float = 1e-6,
) -> Tensor:
    r"""\(-\log\det K\) of the Gaussian Gram kernel of the neurons (to be minimised).

    Computed in float64 (Cholesky of a kernel whose smallest eigenvalue may be the jitter) and
    returned in the input's compute dtype. Memory is \(O(n^2)\): meant for layers of up to a
    few thousand neurons. Returns 0 for fewer than two neurons.
    """
    x = check_neurons(neurons)
    if x.shape[-2] < 2:
        return x.sum((-2, -1)) * 0.0
    batched, added = as_batched(x)
    value = _NegLogDetGaussianKernel.apply(batched, float(eps), half_space, jitter)
    return value[0] if added else value
