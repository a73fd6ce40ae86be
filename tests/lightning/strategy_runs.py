"""Training runs for ``test_strategies.py``: the callback, the hand-written reference and no penalty,
on one device or on 2 CPU processes (gloo).

Run as a script, ``python tests/lightning/strategy_runs.py OUT_DIR SETTING [SETTING ...]`` trains
each 2-process SETTING of :data:`SCRIPT_SETTINGS` (``ddp``, ``fsdp``, ``fsdp2``; Lightning re-launches
this script for rank 1) and every rank saves its gathered full weights to
``OUT_DIR/<setting>-<kind>-rank<r>.pt``. A setting that raises writes ``OUT_DIR/<setting>.error``
and the others still run.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
from models import TinyNet, make_data, trainer_kwargs

from lightning_hsu import HypersphericalUniformity
from lightning_hsu.functional import hyperspherical_energy, neurons_of

KINDS = ("callback", "reference", "baseline")


class HandWrittenMHE:
    """``mhe_reference()`` as a picklable object (ddp_spawn pickles the model): the papers' MHE
    preset by hand, half-space with ``lam_hidden`` on every hidden layer, full space with ``lam_fc``
    on ``fc``. Each layer counts once, however often the forward uses it."""

    def __init__(self, hidden: tuple[str, ...] = ("conv", "hidden"), lam_hidden: float = 1.0, lam_fc: float = 10.0):
        self.hidden = hidden
        self.lam_hidden = lam_hidden
        self.lam_fc = lam_fc

    def __call__(self, m: nn.Module) -> Tensor:
        energy = sum(
            hyperspherical_energy(neurons_of(getattr(m, name)), power=2.0, half_space=True) for name in self.hidden
        )
        return self.lam_hidden * energy + self.lam_fc * hyperspherical_energy(neurons_of(m.fc), power=2.0)


class Net(TinyNet):
    """TinyNet with a configurable batch size. On 2 ranks each takes every other sample, unshuffled
    (run with ``use_distributed_sampler=False``), so 2 ranks × 16 see what one device × 32 sees."""

    reference_layers: tuple[str, ...] = ("conv", "hidden")

    def __init__(self, kind: str = "baseline", batch_size: int = 16) -> None:
        super().__init__(penalty=HandWrittenMHE(self.reference_layers) if kind == "reference" else None)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        data = make_data()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(data, trainer.world_size, trainer.global_rank, shuffle=False)
            return DataLoader(data, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


class SharedLayerNet(Net):
    """A hidden layer ``mid`` applied twice in one forward (weight sharing)."""

    reference_layers = ("conv", "hidden", "mid")

    def __init__(self, kind: str = "baseline", batch_size: int = 16) -> None:
        super().__init__(kind, batch_size)
        fc = self.fc
        del self.fc
        torch.manual_seed(2)
        self.mid = nn.Linear(8, 8)
        self.fc = fc  # registered last: the classifier

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.hidden(self.act(self.conv(x)).flatten(1)))
        h = torch.relu(self.mid(torch.relu(self.mid(h))))
        return self.fc(h)


class FSDP2Net(Net):
    """FSDP2: ``fully_shard`` on every Linear/Conv and on the root, on the data-parallel mesh."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in [m for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class SharedFSDP2Net(FSDP2Net, SharedLayerNet):
    """:class:`SharedLayerNet` under FSDP2: ``mid`` is gathered again for its second call."""


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy refuses CPU by an exact type check and passes ``device_id=None``
    there; wrap with ``device_id=cpu`` instead so FSDP1 runs with gloo."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def _param_name(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def full_weights(trainer: pl.Trainer, pl_module: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) weights, on every rank; a collective under FSDP1/FSDP2."""
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            return {_param_name(k): v.detach().clone().float() for k, v in pl_module.named_parameters()}
    out = {}
    for k, v in pl_module.state_dict().items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = full.detach().clone().float()
    return out


class SaveWeights(pl.Callback):
    """At the end of fit every rank saves ``{"weights": full weights, "outside_forward": what the
    weights look like outside forward}`` to ``<out_dir>/<prefix>-rank<r>.pt``."""

    def __init__(self, out_dir: str | Path, prefix: str) -> None:
        self.out_dir = Path(out_dir)
        self.prefix = prefix

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outside = {
            _param_name(k): (type(v.data).__name__, tuple(getattr(v, "_local_tensor", v).shape))
            for k, v in pl_module.named_parameters()
        }
        record = {"weights": full_weights(trainer, pl_module), "outside_forward": outside}
        torch.save(record, self.out_dir / f"{self.prefix}-rank{trainer.global_rank}.pt")


def train(
    kind: str,
    root: str | Path,
    *,
    model_cls: type[Net] = Net,
    batch_size: int = 16,
    compile_model: bool = False,
    save_as: str | None = None,
    callback: pl.Callback | None = None,
    reference: HandWrittenMHE | None = None,
    **overrides: Any,
) -> dict[str, Tensor]:
    """Train ``model_cls`` for 4 steps with ``kind`` of penalty; return the (rank 0) weights.

    ``callback`` replaces the default ``HypersphericalUniformity(preset="mhe")`` of kind "callback",
    ``reference`` the default hand-written penalty of kind "reference".
    """
    assert kind in KINDS, kind
    model = model_cls(kind, batch_size)
    if reference is not None:
        assert kind == "reference", kind
        model.penalty = reference
    callbacks: list[pl.Callback] = list(overrides.pop("callbacks", []))
    if kind == "callback":
        callbacks.append(callback if callback is not None else HypersphericalUniformity(preset="mhe"))
    if save_as is not None:
        callbacks.append(SaveWeights(root, save_as))
    trainer = pl.Trainer(**trainer_kwargs(root, callbacks=callbacks, **overrides))
    trainer.fit(torch.compile(model) if compile_model else model)
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def load_ranks(out_dir: str | Path, setting: str, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What both ranks saved for ``setting`` and ``kind``; fails with the setting's error if it raised."""
    out = Path(out_dir)
    error = out / f"{setting}.error"
    assert not error.exists(), error.read_text()
    return tuple(torch.load(out / f"{setting}-{kind}-rank{r}.pt", weights_only=True) for r in (0, 1))  # type: ignore[return-value]


# -- 2-process settings run by the script -------------------------------------------------------
#: 2 CPU processes; the model's own sampler splits the data (see :class:`Net`).
TWO_PROCESSES: dict[str, Any] = {"devices": 2, "use_distributed_sampler": False}


def _ddp() -> dict[str, Any]:
    return {"strategy": "ddp", **TWO_PROCESSES}


def _fsdp() -> dict[str, Any]:
    return {"strategy": CPUFSDPStrategy(auto_wrap_policy={nn.Linear, nn.Conv2d}), **TWO_PROCESSES}


def _fsdp2() -> dict[str, Any]:
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return {"strategy": strategy, "model_cls": FSDP2Net, **TWO_PROCESSES}


def _pairs_shared() -> HypersphericalUniformity:
    return HypersphericalUniformity(preset="mhe", shard_across_ranks=True)


#: setting -> (trainer/model overrides, the kinds run under it). The hand-written reference is not
#: run under FSDP: there ``layer.weight`` in ``training_step`` is a flat shard (FSDP1) or a DTensor
#: (FSDP2); the test compares with the single-device reference on the same global batch instead.
SCRIPT_SETTINGS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "ddp": (_ddp, ("callback", "reference", "baseline")),
    "ddp-accumulate": (lambda: {**_ddp(), "accumulate_grad_batches": 2}, ("callback", "reference")),
    "fsdp": (_fsdp, ("callback", "baseline")),
    "fsdp-shared": (lambda: {**_fsdp(), "model_cls": SharedLayerNet}, ("callback",)),
    "fsdp2": (_fsdp2, ("callback", "baseline")),
    "fsdp2-shared": (lambda: {**_fsdp2(), "model_cls": SharedFSDP2Net}, ("callback",)),
    # each rank computes half of the pairs (shard_across_ranks) on the gathered weights
    "fsdp-pairs-shared": (lambda: {**_fsdp(), "callback": _pairs_shared()}, ("callback",)),
    "fsdp2-pairs-shared": (lambda: {**_fsdp2(), "callback": _pairs_shared()}, ("callback",)),
}


def main(out_dir: str, settings: list[str]) -> None:
    out = Path(out_dir)
    for setting in settings:
        make_overrides, kinds = SCRIPT_SETTINGS[setting]
        try:
            for kind in kinds:
                train(kind, out, save_as=f"{setting}-{kind}", **make_overrides())
        except Exception:
            (out / f"{setting}.error").write_text(f"rank {os.environ.get('LOCAL_RANK')}\n{traceback.format_exc()}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
