"""The regularizer interface: a small object that maps a layer's neurons to a penalty.

In the spirit of pytorch-metric-learning's regularizers: each object holds its hyperparameters
(and, for MHP/MHC/CoMHE, a little state of its own), is called on ``[n, d]`` neurons and returns a
scalar to *minimise*. One template object can serve many layers: `Regularizer.spawn` makes
the per-layer copy that owns that layer's state.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from lightning_hsu.functional._matmul import one_thread_graph


class Regularizer:
    """Base class: ``penalty = regularizer(neurons, step=global_step)``."""

    #: Short registry name (``"mhe"``, ``"mhs"``, ...), used in logs and string configs.
    name: ClassVar[str] = ""
    #: Whether `state_dict` carries training state that must be checkpointed.
    stateful: ClassVar[bool] = False
    #: Whether the penalty is a sum over pairs that ranks can share (see `set_shard`).
    supports_sharding: ClassVar[bool] = False
    #: Whether the penalty can be captured in a CUDA graph: true for `Capturable` ones.
    capturable: ClassVar[bool] = False
    #: Whether `Capturable.graph_penalties` batches layers of one shape (capturable ones only).
    batchable: ClassVar[bool] = False
    #: Whether the penalty depends on the neurons alone (no other tensor gets a gradient from it), so
    #: its backward may run on one CPU thread (`one_thread_graph`); set by the built-in regularizers.
    neurons_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that overrides the penalty may sync or keep state: capturable only if it says so.
        if "penalty" in cls.__dict__ and "capturable" not in cls.__dict__:
            cls.capturable = False
        overrides = any(name in cls.__dict__ for name in ("penalty", "graph_penalty", "graph_penalties"))
        if overrides and "batchable" not in cls.__dict__:
            cls.batchable = False
        # a subclass's own penalty may read learnable tensors besides the neurons: not unless it says so
        own_penalty = any(name in cls.__dict__ for name in ("penalty", "neuron_penalty"))
        if own_penalty and "neurons_only" not in cls.__dict__:
            cls.neurons_only = False

    def __init__(self) -> None:
        self.salt = 0
        self._shard: tuple[int, int] | None = None

    def set_shard(self, shard: tuple[int, int] | None) -> None:
        """Compute only the share ``(rank, world_size)`` of the pairs (``None``: all of them).

        The shares' values and gradients sum to the full ones
        (`pairwise_kernel_sum`).
        """
        if shard is not None and not self.supports_sharding:
            raise ValueError(f"{type(self).__name__} cannot be shared across ranks (it is not a sum over pairs)")
        self._shard = shard

    def __call__(self, neurons: Tensor, *, step: int | None = None, check_finite: bool = True) -> Tensor:
        if self.neurons_only:  # on a CPU with several threads: forward and backward passes on one
            return one_thread_graph(lambda x: self._penalty(x, step, check_finite), neurons)
        return self._penalty(neurons, step, check_finite)

    def _penalty(self, neurons: Tensor, step: int | None, check_finite: bool) -> Tensor:
        if check_finite:  # (a regularizer written before `check_finite` existed takes no such argument)
            return self.penalty(neurons, step=step)
        if not self.capturable:
            raise ValueError(f"{type(self).__name__} always checks its input (it is not capturable)")
        return self.penalty(neurons, step=step, check_finite=False)

    def penalty(self, neurons: Tensor, *, step: int | None = None, check_finite: bool = True) -> Tensor:
        """The penalty of ``neurons`` (``[n, d]``); ``step`` is the global training step.

        ``check_finite=False`` (capturable regularizers only) makes no host synchronisation and no
        decision on the weights' values: NaN/inf weights then give a NaN penalty instead of an
        error, for the caller to check once for all layers.
        """
        raise NotImplementedError

    def spawn(self, key: str) -> Regularizer:
        """A fresh copy for one layer; ``key`` (the layer name) salts any random state."""
        clone = copy.deepcopy(self)
        clone.salt = zlib.crc32(key.encode())
        return clone

    def state_dict(self) -> dict[str, Any]:
        """Training state (tensors and primitives only, so checkpoints load with weights_only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments, for logging and ``save_hyperparameters``."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "salt"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


class Capturable(Regularizer):
    """The capability of a regularizer whose penalty a CUDA graph can capture.

    Called with ``check_finite=False`` it makes no host sync and no decision on the weights'
    values, and `graph_penalty` depends on the weights and on tensors that
    `refresh_graph_inputs` fills in place before each replay, nothing else (not on ``step``
    nor on other state). Set `batchable` when `graph_penalties` gives the ``[batch]``
    penalties of a ``[batch, n, d]`` stack of layers' neurons in one call: then the layers of one
    shape share one call in a CUDA graph, and the graph launches that many fewer small kernels.
    """

    capturable: ClassVar[bool] = True

    def refresh_graph_inputs(self, neurons: Tensor, *, step: int | None = None) -> None:
        """Before each replay of a captured `graph_penalty` of ``neurons``: write, in place,
        what the penalty at ``step`` reads besides the weights (CoMHE: the step's projections).
        Nothing by default."""

    def graph_penalty(self, neurons: Tensor) -> Tensor:
        """The penalty as a CUDA graph captures it: no host sync, and no input but ``neurons`` and
        what `refresh_graph_inputs` wrote. By default the penalty with ``check_finite=False``."""
        return self(neurons, check_finite=False)

    def graph_penalties(self, neurons: Tensor, members: Sequence[Regularizer]) -> Tensor:
        """The ``[batch]`` `graph_penalty` of each ``[n, d]`` slice of ``neurons``, slice ``i``
        with what ``members[i]`` (a regularizer of this type and hyperparameters, this one among
        them) reads besides the neurons (`batchable` regularizers only). By default
        `graph_penalty` of the whole stack: right for a regularizer that reads nothing per
        layer and whose penalty takes ``[batch, n, d]``."""
        if not self.batchable:
            raise ValueError(f"{type(self).__name__} computes one layer at a time (it is not batchable)")
        return self.graph_penalty(neurons)
