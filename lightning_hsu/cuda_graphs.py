"""Many layers' penalties replayed as CUDA graphs: one launch forward, one backward (pure PyTorch).

On a GPU a layer's penalty is a few dozen small kernels (Gram product, kernel passes, gradient
product), each taking microseconds to run and as long again to launch from Python, so launching
them from Python costs more than running them (measurements in `docs/performance.md`).
`GraphedPenalties` captures the penalties of a fixed list of
weights once (``torch.cuda.make_graphed_callables``: a forward graph, whose closed-form gradient
of `pairwise` is formed in it, and a backward graph) and replays
them every step, from the host at the cost of two launches.

What a capture needs, and how it is kept (see the PyTorch notes on CUDA graphs):

- No host sync and no decision on the weights' values inside a penalty: only
  `capturable` regularizers, called with
  ``check_finite=False``; NaN/inf weights give a NaN penalty, which the caller checks once.
- The same memory every step: the graphs read the weights where they were at capture. The
  optimizers update parameters in place; a weight that was moved or re-allocated since
  (`GraphedPenalties.matches` is false) needs a new capture.
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

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_hsu.regularizers import Capturable

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
            return cast(Tensor, self._replay(*self.weights))


@dataclass(frozen=True, eq=False)
class GraphedLayer:
    """One layer's penalty as `GraphReplay` computes it, as plain data.

    Attributes:
        token: the identity of the (layer, rule) pair; a capture covers a fixed list of tokens.
        weight: the leaf tensor the neurons are read from.
        neurons_from: ``weight → [n, d]`` neurons (a slice, transpose or reshape of it).
        regularizer: a `capturable` regularizer.
        coefficient: what the loss receives per unit of penalty this step.
        gradient_scale: the factor on the coefficient in the loss (the world size when the ranks
            share the pairs, so that the averaged gradient is the full one; else 1).
    """

    token: int
    weight: Tensor
    neurons_from: Callable[[Tensor], Tensor]
    regularizer: Capturable
    coefficient: float
    gradient_scale: float = 1.0


@dataclass
class Replayed:
    """What one replay gave, in the order of ``layers``: the term to add to the loss, and each
    layer's value before and after its coefficient (detached copies)."""

    layers: list[GraphedLayer]
    loss: Tensor
    values: Tensor
    weighted: Tensor


def _group_penalties(members: list[GraphedLayer], *weights: Tensor) -> Tensor:
    """The penalties of a group of layers from their weights: one call, batched over the group's
    layers of one shape (a single layer's is its scalar penalty)."""
    first = members[0]
    if len(members) == 1:
        return first.regularizer.graph_penalty(first.neurons_from(weights[0]))
    neurons = torch.stack([m.neurons_from(w) for m, w in zip(members, weights, strict=True)])
    return first.regularizer.graph_penalties(neurons, [m.regularizer for m in members])


class GraphReplay:
    """The penalties of many layers replayed from CUDA graphs, captured at first use.

    Keeps up to ``max_graphs`` captures, one per list of layers (a model whose forward runs
    different layers from step to step would otherwise capture without end), and captures again
    when a weight moved. Layers of one neuron shape whose
    `batchable` regularizers agree share one call
    (``batch=True``): on a GPU a call is a few dozen small kernels whatever its size.

    Args:
        device_type: the device whose weights are captured (``"cuda"``; a test passes ``"cpu"``
            with an eager ``make_graphed``).
        batch: batch the layers of one shape into one call.
        max_graphs: captures kept at once.
        make_graphed: the capture (default ``torch.cuda.make_graphed_callables``).
    """

    def __init__(
        self,
        *,
        device_type: str = "cuda",
        batch: bool = True,
        max_graphs: int = 4,
        make_graphed: GraphMaker | None = None,
    ) -> None:
        self.device_type = device_type
        self.batch = batch
        self.max_graphs = max_graphs
        self.make_graphed = make_graphed
        #: Captures made so far (one per list of layers, again when a weight moved).
        self.captures = 0
        self._graphs: dict[tuple[tuple[int, ...], ...], GraphedPenalties] = {}
        # the coefficients of the last replay of each capture and their device copy
        self._factors: dict[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], Tensor]] = {}
        # per list of layers (and weight shapes): the groups one call computes, worked out once
        self._groupings: dict[tuple[object, ...], list[list[int]]] = {}

    def available(self) -> bool:
        """Whether graphs can be captured now (a user capturing the whole step already has what
        this gives: stay eager inside it)."""
        if self.device_type != "cuda":
            return True
        return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()

    def eligible(self, regularizer: Capturable, weight: Tensor) -> bool:
        """Whether a layer's penalty can be captured: a capturable regularizer of a trainable leaf
        weight on the current device of ``device_type``."""
        if weight.device.type != self.device_type:
            return False
        if weight.is_cuda and weight.device.index != torch.cuda.current_device():
            return False  # a graph runs on one device: layers placed on another stay eager
        return regularizer.capturable and weight.is_leaf and weight.requires_grad

    def clear(self) -> None:
        """Free the captures (and their memory)."""
        self._graphs.clear()
        self._factors.clear()
        self._groupings.clear()

    def _groups(self, layers: list[GraphedLayer]) -> list[list[GraphedLayer]]:
        signature = (self.batch, *((m.token, m.weight.shape, m.weight.dtype) for m in layers))
        layout = self._groupings.get(signature)
        if layout is None:
            groups: dict[object, list[int]] = {}
            for index, m in enumerate(layers):
                key: object = m.token
                if self.batch and m.regularizer.batchable:
                    neurons = m.neurons_from(m.weight)
                    hparams = repr(sorted(m.regularizer.hparams().items()))
                    key = (type(m.regularizer), hparams, m.gradient_scale, tuple(neurons.shape), neurons.dtype)
                groups.setdefault(key, []).append(index)
            if len(self._groupings) >= 4 * self.max_graphs:  # layers that change without end
                self._groupings.clear()
            layout = self._groupings[signature] = list(groups.values())
        return [[layers[i] for i in group] for group in layout]

    def __call__(self, layers: list[GraphedLayer], step: int) -> Replayed:
        """Replay the penalties of ``layers`` (capturing first if needed). A failed capture raises
        ``RuntimeError``; the caller then computes the penalties eagerly."""
        groups = self._groups(layers)
        ordered = [m for group in groups for m in group]  # the order of the graphs' values
        key = tuple(tuple(m.token for m in group) for group in groups)  # a grouping is its own capture
        weights = [m.weight for m in ordered]
        with torch.no_grad():  # before the capture too: it reads what this writes (CoMHE's projections)
            for m in ordered:
                m.regularizer.refresh_graph_inputs(m.neurons_from(m.weight), step=step)
        graphs = self._graphs.pop(key, None)
        if graphs is None or not graphs.matches(weights):
            graphs = None  # free the old capture's memory before making the new one
            graphs = GraphedPenalties(
                [functools.partial(_group_penalties, group) for group in groups],
                weights,
                counts=[len(group) for group in groups],
                make_graphed=self.make_graphed,
            )
            self.captures += 1
        while len(self._graphs) >= self.max_graphs:
            evicted = next(iter(self._graphs))
            del self._graphs[evicted]
            self._factors.pop(evicted, None)
        self._graphs[key] = graphs
        values = graphs()
        seen = values.detach().clone()  # the next replay overwrites the graph's output
        factors = self._coefficients(key, ordered, values)
        return Replayed(ordered, torch.dot(values, factors[1]), seen, seen * factors[0])

    def _coefficients(self, key: tuple[tuple[int, ...], ...], layers: list[GraphedLayer], values: Tensor) -> Tensor:
        """``[2, L]``: the coefficients, then the same times their gradient scale, on the values'
        device. Kept while they do not change: a blocking copy to the GPU waits for its queue (a
        host sync); a changed one (a schedule) is copied from pinned memory without blocking."""
        plain = [m.coefficient for m in layers]
        scaled = [m.coefficient * m.gradient_scale for m in layers]
        wanted = (*plain, *scaled)
        cached = self._factors.get(key)
        if cached is not None and cached[0] == wanted:
            return cached[1]
        host = torch.tensor([plain, scaled], dtype=values.dtype)
        if values.is_cuda:
            host = host.pin_memory()
        factors = host.to(values.device, non_blocking=True)
        self._factors[key] = (wanted, factors)
        return factors
