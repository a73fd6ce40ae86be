"""Worker of the 2-process gloo test: feature metrics under DDP and the monitor's FSDP gathers.

Kept apart from the test module so that each spawned process imports only what it needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from lightning_hsu.callbacks.monitor import NeuronDiversityMonitor
from lightning_hsu.functional import neurons_of
from lightning_hsu.metrics import FeatureEnergy, FeatureMinimumAngle, FeatureUniformity


def feature_data() -> torch.Tensor:
    return torch.randn(90, 6, generator=torch.Generator().manual_seed(7))


def make_metrics() -> dict[str, object]:
    return {
        "uniformity": FeatureUniformity(max_samples=1000),
        "energy": FeatureEnergy(power=1.0, max_samples=1000),
        "min_angle": FeatureMinimumAngle(max_samples=1000),
        # Capped below the 90 rows: the bottom-k sample is the same however the rows are split.
        "uniformity_capped": FeatureUniformity(max_samples=16, seed=3),
    }


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))


def _fake_trainer(model: nn.Module, rank: int) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(model=model), is_global_zero=rank == 0)


def _gather(monitor: NeuronDiversityMonitor, trainer: SimpleNamespace, root: nn.Module) -> dict[str, torch.Tensor]:
    monitor._selected = monitor._resolve(root, trainer.strategy.model)
    return {name: t.clone() for name, t, _ in monitor._gathered_neurons(trainer, root)}  # type: ignore[arg-type]


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results: dict[str, object] = {}
        # torchmetrics under DDP: each rank sees an uneven, interleaved share, in odd batch sizes.
        metrics = make_metrics()
        share = feature_data()[rank::world_size]
        if rank == 1:
            share = share[:40]
        for batch in share.split(7):
            for metric in metrics.values():
                metric.update(batch)
        results["metrics"] = {name: float(m.compute()) for name, m in metrics.items()}

        # FSDP1, auto-wrapped per Linear: the monitor summons one unit at a time on every rank.
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        fresh = small_model()
        reference = {name: neurons_of(fresh.get_submodule(name)).detach().clone() for name in ("0", "2")}
        model = small_model()
        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), device_id=torch.device("cpu"))
        wrapped(torch.randn(3, 6)).sum().backward()  # the lazy initialisation a training step does
        gathered = _gather(NeuronDiversityMonitor(), _fake_trainer(wrapped, rank), wrapped.module)
        results["fsdp1"] = {name: bool(torch.equal(gathered[name], reference[name])) for name in reference}
        results["fsdp1_names"] = sorted(gathered)

        # FSDP2: DTensor weights, gathered with full_tensor() on every rank.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        model2 = small_model()
        model2.add_module("up", nn.ConvTranspose1d(2, 3, kernel_size=3))
        up_reference = neurons_of(model2.up).detach().clone()
        for layer in (model2[0], model2[2], model2.up):
            fully_shard(layer, mesh=mesh)
        fully_shard(model2, mesh=mesh)
        gathered2 = _gather(NeuronDiversityMonitor(), _fake_trainer(model2, rank), model2)
        results["fsdp2_sharded"] = type(model2[0].weight).__name__
        results["fsdp2"] = {name: bool(torch.equal(gathered2[name], reference[name])) for name in reference}
        results["fsdp2_up"] = bool(torch.equal(gathered2["up"], up_reference))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # Leave without tearing down gloo: its destructors join worker threads while holding the
        # GIL, which deadlocked or aborted a rank now and then (seen in clean-clone CI runs).
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)
