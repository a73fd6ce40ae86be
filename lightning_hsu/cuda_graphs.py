"""Many layers' penalties replayed as CUDA graphs: one launch forward, one backward (pure PyTorch).

On a GPU a layer's penalty is a few dozen small kernels (Gram product, kernel passes, gradient
product), each taking microseconds to run and as long again to launch from Python: measured on an
H200 (``docs/performance.md``), the eager penalties of a CIFAR ResNet-18's 21 layers took longer
than the network's own step. :class:`GraphedPenalties` captures the penalties of a fixed list of
weights once (``torch.cuda.make_graphed_callables``: a forward graph, whose closed-form gradient
of :mod:`~lightning_hsu.functional.pairwise` is formed in it, and a backward graph) and replays
them every step, from the host at the cost of two launches.

What a capture needs, and how it is kept (see the PyTorch notes on CUDA graphs):

- No host sync and no decision on the weights' values inside a penalty: only
  :attr:`~lightning_hsu.regularizers.Regularizer.capturable` regularizers, called with
  ``check_finite=False``; NaN/inf weights give a NaN penalty, which the caller checks once.
- The same memory every step: the graphs read the weights where they were at capture. The
  optimizers update parameters in place; a weight that was moved or re-allocated since
  (:meth:`GraphedPenalties.matches` is false) needs a new capture.
- One forward before each backward: the backward graph reads what the last forward replay
  saved, so a second replay before the first one's backward would give that backward the
  second's gradient. The engine replays once per training step, before that step's backward.
- No live autograd node of the weights in the capture: inside a training step the network's own
  graph holds the parameters' gradient accumulators, made on the default stream, and a capture
  that reaches them is invalidated (seen on an H200 inside ``Trainer.fit``). The capture therefore
  differentiates with respect to fresh leaves that share the weights' memory; the replay is
  applied to the weights themselves, whose gradients are accumulated outside the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: What a capture takes: ``(function, sample_args) -> graphed function`` with autograd, like
#: ``torch.cuda.make_graphed_callables``.
GraphMaker = Callable[[Callable[..., Tensor], tuple[Tensor, ...]], Callable[..., Tensor]]


def _layout(weights: Sequence[Tensor]) -> tuple[tuple[int, torch.Size, torch.dtype, torch.device], ...]:
    return tuple((w.data_ptr(), w.shape, w.dtype, w.device) for w in weights)


class GraphedPenalties:
    """The penalties ``[p_1(w_1), ..., p_L(w_L)]`` of fixed weights, computed by graph replay.

    Args:
        penalties: one function per weight, mapping the weight to a scalar penalty with no host
            sync (e.g. a capturable regularizer of the layer's neurons, ``check_finite=False``);
            with ``counts``, one function per group of consecutive weights.
        weights: the leaf tensors (parameters) the penalties read, on one CUDA device.
        counts: how many consecutive weights each function takes (default: one each); a function
            of ``k`` weights returns their ``[k]`` penalties (one batched call for layers of one
            shape launches the kernels of one layer).
        make_graphed: the capture (default ``torch.cuda.make_graphed_callables``); a test can pass
            an eager stand-in to check the bookkeeping without a GPU.

    Calling the object returns the ``[L]`` penalties of the weights' current values (in the order of
    ``weights``), differentiable with respect to the weights (float64 if any weight is float64,
    else float32). The returned tensor is a view of the graph's output buffer: clone what must
    outlive the next call.
    """

    def __init__(
        self,
        penalties: Sequence[Callable[[Tensor], Tensor]],
        weights: Sequence[Tensor],
        *,
        counts: Sequence[int] | None = None,
        make_graphed: GraphMaker | None = None,
    ) -> None:
        sizes = tuple(counts) if counts is not None else (1,) * len(penalties)
        if not weights or len(penalties) != len(sizes) or any(k < 1 for k in sizes) or sum(sizes) != len(weights):
            raise ValueError(
                f"need one penalty per weight or per group of `counts`, got {len(penalties)} penalties, "
                f"counts {list(sizes)} and {len(weights)} weights"
            )
        self.weights = tuple(weights)
        self._layout = _layout(self.weights)
        dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
        functions = tuple(penalties)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]

        def stacked(*current: Tensor) -> Tensor:
            values = [
                p(*current[start : start + k]).reshape(k).to(dtype)
                for p, start, k in zip(functions, starts, sizes, strict=True)
            ]
            return torch.cat(values)

        make = torch.cuda.make_graphed_callables if make_graphed is None else make_graphed
        # same memory, new leaves (see the module docstring); the replay reads the weights'
        # memory, so no input is copied as long as they stay where they are
        aliases = tuple(w.detach().requires_grad_(w.requires_grad) for w in self.weights)
        # the capture refuses autocast's weight cache, and the penalties run in full precision anyway
        with torch.autocast("cuda", enabled=False):
            self._replay = make(stacked, aliases)

    def matches(self, weights: Sequence[Tensor]) -> bool:
        """Whether the graphs read these very tensors, at the same addresses, shapes and dtypes."""
        return (
            len(weights) == len(self.weights)
            and all(a is b for a, b in zip(weights, self.weights, strict=True))
            and _layout(weights) == self._layout
        )

    def __call__(self) -> Tensor:
        if _layout(self.weights) != self._layout:
            raise RuntimeError(
                "a weight was moved or re-allocated since its penalties were captured in a CUDA graph; "
                "capture them again (GraphedPenalties.matches)"
            )
        with torch.autocast("cuda", enabled=False):
            return self._replay(*self.weights)
