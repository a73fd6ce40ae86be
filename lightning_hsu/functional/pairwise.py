r"""Sums over pairs of neurons, block by block, with the gradient in closed form.

For unit neurons :math:`\hat W \in \mathbb{R}^{n\times d}` and a pair kernel :math:`f` of the
cosine (:mod:`~lightning_hsu.functional.kernels`), the **full-space** sum is

.. math:: S = \sum_{i<j} f(c_{ij}), \qquad \partial S/\partial \hat w_k = \sum_{j\ne k} f'(c_{kj})\,\hat w_j.

The **half-space** sum (Liu et al., NeurIPS 2018) runs over the :math:`2n` vectors
:math:`\{\hat w_i\}\cup\{-\hat w_i\}` without building them: the pairs :math:`(i,j)` and
:math:`(-i,-j)` have cosine :math:`c_{ij}`, the pairs :math:`(i,-j)` and :math:`(j,-i)` have
:math:`-c_{ij}`, and :math:`(i,-i)` has :math:`-\lVert\hat w_i\rVert^2`, hence

.. math:: S_{half} = \sum_{i\ne j}\big[f(c_{ij}) + f(-c_{ij})\big] + \sum_i f(-\lVert\hat w_i\rVert^2)

over :math:`n(2n-1)` pairs, all from the :math:`n\times n` Gram matrix.

Rows are processed in blocks of ``block_rows``: the extra memory is :math:`O(\text{block}\cdot n)`
and never :math:`O(n^2)` once ``n`` is above the dense threshold. The forward pass also forms the
gradient (one more matrix product per block), so the backward pass is a scaling: two products of
the size of :math:`\hat W\hat W^\top` in all, the matrix-multiply lower bound.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_hsu.functional.kernels import PairKernel

#: Largest number of Gram entries (per batch element) held at once by the automatic choice of
#: block size: a layer with n <= 4096 is done in one dense block.
DENSE_BLOCK_ELEMENTS = 4096 * 4096


def block_rows_for(n: int, chunk_size: int | None) -> int:
    """Rows per block: ``chunk_size`` if given, else dense up to 4096 neurons, then chunked."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        return min(chunk_size, max(n, 1))
    return max(1, min(n, DENSE_BLOCK_ELEMENTS // max(n, 1)))


def pair_count(n: int, half_space: bool) -> int:
    """Number of unordered pairs: :math:`n(n-1)/2`, or :math:`n(2n-1)` in half-space."""
    return n * (2 * n - 1) if half_space else n * (n - 1) // 2


def _zero_self_pairs(block: Tensor, start: int) -> Tensor:
    """View of the entries (i, i) of a ``[batch, rows, n]`` block whose rows start at ``start``."""
    rows = block.shape[1]
    return torch.diagonal(block[:, :, start : start + rows], dim1=1, dim2=2)


def _block_sum(
    unit: Tensor, kernel: PairKernel, half_space: bool, block_rows: int, with_grad: bool
) -> tuple[Tensor, Tensor | None]:
    batch, n, _ = unit.shape
    total = unit.new_zeros(batch)
    grad = torch.zeros_like(unit) if with_grad else None
    transposed = unit.transpose(1, 2)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        cos = torch.bmm(unit[:, start:stop], transposed)  # [batch, rows, n]
        _zero_self_pairs(cos, start).zero_()  # kernel evaluated at c = 0 there, then dropped
        value, deriv = kernel(cos, with_grad)
        _zero_self_pairs(value, start).zero_()
        if half_space:
            value_neg, deriv_neg = kernel(-cos, with_grad)
            _zero_self_pairs(value_neg, start).zero_()
            sq_norm = (unit[:, start:stop] * unit[:, start:stop]).sum(-1)
            anti, anti_deriv = kernel(-sq_norm, with_grad)
            total += value.sum((1, 2)) + value_neg.sum((1, 2)) + anti.sum(1)
            if grad is not None:
                assert deriv is not None and deriv_neg is not None and anti_deriv is not None
                coeff = 2.0 * (deriv - deriv_neg)
                _zero_self_pairs(coeff, start).zero_()
                grad[:, start:stop] = torch.bmm(coeff, unit) - (2.0 * anti_deriv.unsqueeze(-1) * unit[:, start:stop])
        else:
            total += 0.5 * value.sum((1, 2))
            if grad is not None:
                assert deriv is not None
                _zero_self_pairs(deriv, start).zero_()
                grad[:, start:stop] = torch.bmm(deriv, unit)
    return total, grad


class _PairwiseKernelSum(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        unit: Tensor,
        kernel: PairKernel,
        half_space: bool,
        block_rows: int,
    ) -> Tensor:
        total, grad = _block_sum(unit, kernel, half_space, block_rows, ctx.needs_input_grad[0])  # type: ignore[attr-defined]
        if grad is not None:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor
    ) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None, None, None
        (grad,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * grad_total.view(-1, 1, 1), None, None, None


def pairwise_kernel_sum(
    unit: Tensor, kernel: PairKernel, *, half_space: bool = False, chunk_size: int | None = None
) -> Tensor:
    """Sum of ``kernel`` over all pairs of the unit neurons ``unit`` (``[batch, n, d]``).

    Returns a ``[batch]`` tensor, differentiable with respect to ``unit``. See the module
    docstring for the formula; ``chunk_size`` rows are processed at a time (``None``: dense up
    to 4096 neurons, then blocks holding at most 4096² Gram entries).
    """
    rows = block_rows_for(unit.shape[1], chunk_size)
    return _PairwiseKernelSum.apply(unit, kernel, half_space, rows)


@torch.no_grad()
def extreme_pair_cosine(unit: Tensor, *, half_space: bool, chunk_size: int | None, largest: bool) -> Tensor:
    """Largest (or smallest) cosine over all pairs, per batch element, without gradient.

    In half-space the candidates are :math:`\\pm c_{ij}` and :math:`-\\lVert\\hat w_i\\rVert^2`.
    """
    batch, n, _ = unit.shape
    rows = block_rows_for(n, chunk_size)
    fill = -torch.inf if largest else torch.inf
    best = unit.new_full((batch,), fill)
    reduce = torch.amax if largest else torch.amin
    pick = torch.maximum if largest else torch.minimum
    transposed = unit.transpose(1, 2)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        cos = torch.bmm(unit[:, start:stop], transposed)
        _zero_self_pairs(cos, start).fill_(fill)
        best = pick(best, reduce(cos, dim=(1, 2)))
        if half_space:
            _zero_self_pairs(cos, start).fill_(-fill)
            best = pick(best, reduce(-cos, dim=(1, 2)))
            sq_norm = (unit[:, start:stop] * unit[:, start:stop]).sum(-1)
            best = pick(best, reduce(-sq_norm, dim=1))
    return best
