"""CoMHE, compressive minimum hyperspherical energy (Lin et al., CVPR 2020), as a regularizer object."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_hsu.functional import compressive_energy, gaussian_projections
from lightning_hsu.functional._common import DEFAULT_EPS
from lightning_hsu.functional._matmul import PRODUCT_PRECISIONS, ProductPrecision
from lightning_hsu.regularizers.base import Capturable, Regularizer
from lightning_hsu.validation import choice, flag, integer, positive_float, positive_int


class CoMHE(Capturable):
    """Compressive MHE (Lin et al., CVPR 2020): MHE of random projections, averaged.

    Args:
        projection_dim: dimension ``p`` of each projection (official best: 40).
        projections: number ``K`` of projections (official best: 20).
        power, distance, half_space, eps: as for `MHE` (official: s = 2).
        resample: draw fresh projections every training step (official) or keep one draw.
        seed: base seed; the draw for step ``k`` of layer ``name`` depends only on
            ``(seed, name, k)``, so all ranks agree and a resumed run draws the same matrices.
        precision: operands of the pair sums' products, as for `MHE`.
    """

    neurons_only = True

    name = "comhe"
    stateful = True
    supports_sharding = True
    capturable = True
    batchable = True

    def __init__(
        self,
        projection_dim: int = 40,
        projections: int = 20,
        power: float = 2.0,
        distance: Literal["euclidean", "angular"] = "euclidean",
        half_space: bool = False,
        resample: bool = True,
        seed: int = 0,
        eps: float = DEFAULT_EPS,
        precision: ProductPrecision = "float32",
    ) -> None:
        super().__init__()
        self.projection_dim = positive_int("CoMHE", "projection_dim", projection_dim)
        self.projections = positive_int("CoMHE", "projections", projections)
        self.power = positive_float("CoMHE", "power", power, allow_zero=True)
        self.distance = choice("CoMHE", "distance", distance, ("euclidean", "angular"))
        self.half_space = flag("CoMHE", "half_space", half_space)
        self.resample = flag("CoMHE", "resample", resample)
        self.seed = integer("CoMHE", "seed", seed)
        self.eps = positive_float("CoMHE", "eps", eps)
        self.precision = choice("CoMHE", "precision", precision, PRODUCT_PRECISIONS)
        self._calls = 0
        self._graph_projections: Tensor | None = None

    def projection_matrices(
        self, in_dim: int, step: int | None, device: torch.device, *, out: Tensor | None = None
    ) -> Tensor:
        """The ``[K, p, in_dim]`` projections used at ``step`` (a call counter if ``None``), written
        into ``out`` if given.

        Drawn by a generator seeded from ``(seed, layer, step)``, on a CUDA device when the layer is
        there: the host neither draws nor copies ~``K p d`` numbers per layer and step. The same
        seed therefore gives other (identically distributed) matrices on a GPU than on the CPU;
        every rank, and a resumed run, on the same kind of device draws the same.
        """
        draw = 0 if not self.resample else (step if step is not None else self._calls)
        seed = (self.seed * 1_000_003 + self.salt * 7_919 + draw) % (2**63)
        device = torch.device(device)
        # other accelerators keep the host's draw, copied over (not every backend has generators)
        generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
        return gaussian_projections(
            in_dim, count=self.projections, dim=self.projection_dim, generator=generator, device=device, out=out
        )

    def penalty(self, neurons: Tensor, *, step: int | None = None, check_finite: bool = True) -> Tensor:
        proj = self.projection_matrices(neurons.shape[-1], step, neurons.device)
        self._calls += 1
        return self._energy(neurons, proj, check_finite)

    def refresh_graph_inputs(self, neurons: Tensor, *, step: int | None = None) -> None:
        """Draw this step's projections into the buffer that `graph_penalty` reads (allocated
        once per layer shape and device), with the numbers `penalty` would draw."""
        shape = (self.projections, self.projection_dim, neurons.shape[-1])
        buffer = self._graph_projections
        if buffer is None or buffer.shape != shape or buffer.device != neurons.device:
            buffer = self._graph_projections = torch.empty(shape, device=neurons.device)
        self.projection_matrices(shape[-1], step, neurons.device, out=buffer)
        self._calls += 1

    def graph_penalty(self, neurons: Tensor) -> Tensor:
        return self._energy(neurons, self._graph_buffer(), False)

    def graph_penalties(self, neurons: Tensor, members: Sequence[Regularizer]) -> Tensor:
        """Each layer's penalty under its own projections (its member's buffer), in one call."""
        buffers = [member._graph_buffer() for member in members]  # type: ignore[attr-defined]
        return self._energy(neurons, torch.stack(buffers), False)

    def _graph_buffer(self) -> Tensor:
        if self._graph_projections is None:
            raise RuntimeError(
                "CoMHE.graph_penalty reads the projections that refresh_graph_inputs draws; call it first"
            )
        return self._graph_projections

    def _energy(self, neurons: Tensor, projections: Tensor, check_finite: bool) -> Tensor:
        return compressive_energy(
            neurons,
            projections,
            power=self.power,
            distance=self.distance,  # type: ignore[arg-type]
            half_space=self.half_space,
            eps=self.eps,
            shard=self._shard,
            check_finite=check_finite,
            precision=self.precision,  # type: ignore[arg-type]
        )

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._calls = int(state.get("calls", 0))
