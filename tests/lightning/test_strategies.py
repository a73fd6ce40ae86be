"""``HypersphericalUniformity`` trains exactly like ``loss + λ·R`` written by hand into
``training_step``, on every strategy and precision that runs on CPU.

Every test trains TinyNet (or a variant) for 4 steps with the MHE preset and compares the trained
weights with the hand-written reference (and checks that they differ from the unregularised
baseline, so that a penalty that never arrives fails). 2-process runs use gloo: each rank takes
every other sample without shuffling, so 2 ranks × 16 samples see the same global batch as one
device × 32, and the single-device reference on batches of 32 is the reference for them too.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from models import trainer_kwargs
from strategy_runs import SCRIPT_SETTINGS, TWO_PROCESSES, HandWrittenMHE, Net, SharedLayerNet, load_ranks, train

from lightning_hsu import HypersphericalUniformity
from lightning_hsu.regularizers import Regularizer

#: Observed differences are ≤ 1.2e-7 (float32 reduction order across 2 ranks); 0 on one device.
ATOL, RTOL = 1e-6, 1e-5


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")


def assert_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], by: float = 1e-3) -> None:
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert gap > by, f"the runs differ by only {gap:.2e}: what should change them (penalty, clipping) had no effect"


@pytest.fixture(scope="module")
def single_device_32(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Single-device reference and baseline on batches of 32 (= 2 ranks × 16)."""
    root = tmp_path_factory.mktemp("single32")
    return {kind: train(kind, root, batch_size=32) for kind in ("reference", "baseline")}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    """Every setting of ``SCRIPT_SETTINGS`` (DDP, FSDP1, FSDP2, ...) with 2 gloo processes, all in
    one launch of ``strategy_runs.py``: Lightning re-launches the script for rank 1, so
    ``strategy="ddp"`` cannot run inside pytest, and one launch is cheaper than one per setting."""
    out = tmp_path_factory.mktemp("two_process")
    script = Path(__file__).with_name("strategy_runs.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(out), *SCRIPT_SETTINGS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


# -- single device --------------------------------------------------------------------------------
def test_callback_trains_like_hand_written_penalty_on_single_device(tmp_path):
    callback = train("callback", tmp_path)
    assert_same(callback, train("reference", tmp_path))
    assert_differ(callback, train("baseline", tmp_path))


def _fp16_with_grad_scaler() -> dict:
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}


@pytest.mark.parametrize(
    "precision",
    [lambda: {"precision": "bf16-mixed"}, _fp16_with_grad_scaler],
    ids=["bf16-mixed", "fp16-grad-scaler"],
)
def test_callback_trains_like_hand_written_penalty_under_mixed_precision(tmp_path, precision):
    settings = precision()
    callback = train("callback", tmp_path, **settings)
    if "plugins" in settings:  # the GradScaler really scaled the loss
        assert settings["plugins"][0].scaler._scale is not None
    assert_same(callback, train("reference", tmp_path, **precision()))
    assert_differ(callback, train("baseline", tmp_path, **precision()))


def test_callback_trains_like_hand_written_penalty_with_gradient_accumulation(tmp_path):
    callback = train("callback", tmp_path, accumulate_grad_batches=2)
    assert_same(callback, train("reference", tmp_path, accumulate_grad_batches=2))
    assert_differ(callback, train("baseline", tmp_path, accumulate_grad_batches=2))


def test_callback_trains_like_hand_written_penalty_with_gradient_clipping(tmp_path):
    callback = train("callback", tmp_path, gradient_clip_val=0.05)
    assert_same(callback, train("reference", tmp_path, gradient_clip_val=0.05))
    assert_differ(callback, train("baseline", tmp_path, gradient_clip_val=0.05))
    assert_differ(callback, train("reference", tmp_path))  # the clipping took effect


def test_compiled_module_trains_like_hand_written_penalty(tmp_path):
    """The compiled module goes to ``trainer.fit``; the reference runs uncompiled."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train("callback", tmp_path, compile_model=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert_same(compiled, train("reference", tmp_path))


def test_layer_called_twice_is_penalised_once_per_step(tmp_path):
    callback = train("callback", tmp_path, model_cls=SharedLayerNet)
    assert_same(callback, train("reference", tmp_path, model_cls=SharedLayerNet))
    counted_twice = HandWrittenMHE(hidden=("conv", "hidden", "mid", "mid"))
    assert_differ(callback, train("reference", tmp_path, model_cls=SharedLayerNet, reference=counted_twice))


class _EvalNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.eval_batches: Counter[str] = Counter()

    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        self.eval_batches[self.trainer.state.stage.value] += 1
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):  # type: ignore[override]
        self.eval_batches["test"] += 1
        return super().validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):  # type: ignore[override]
        self.eval_batches["predict"] += 1
        return self(batch[0])

    def test_dataloader(self):  # type: ignore[override]
        return self.val_dataloader()

    def predict_dataloader(self):  # type: ignore[override]
        return self.val_dataloader()


def test_validation_test_and_predict_compute_no_penalty(tmp_path, monkeypatch):
    """A spy on every regularizer call records the loop it ran in: only training steps pay, also
    while the callback's hooks are live for the sanity check and the validation loop inside fit."""
    stages: list[str] = []
    original_call = Regularizer.__call__

    def spy(self, neurons, *, step=None):
        stages.append(trainer.state.stage.value)
        return original_call(self, neurons, step=step)

    monkeypatch.setattr(Regularizer, "__call__", spy)
    model = _EvalNet()
    kw = trainer_kwargs(tmp_path, num_sanity_val_steps=1, limit_val_batches=2, val_check_interval=2)
    trainer = pl.Trainer(**kw, callbacks=[HypersphericalUniformity(preset="mhe")])
    trainer.fit(model)
    assert model.eval_batches == {"sanity_check": 1, "validate": 4}  # 2 validation runs of 2 batches
    assert stages == ["train"] * 4 * 3  # 4 steps × (conv, hidden, fc)

    stages.clear()
    trainer.validate(model)
    trainer.test(model)
    trainer.predict(model)
    assert model.eval_batches["test"] == 2 and model.eval_batches["predict"] == 2
    assert stages == []


# -- 2 processes ----------------------------------------------------------------------------------
@pytest.mark.distributed
def test_ddp_spawn_trains_like_hand_written_penalty(tmp_path, single_device_32):
    """Only the callback runs under ddp_spawn (each spawn costs ~15 s); the DDP test below shows
    that the hand-written reference under DDP equals the single-device one."""
    train("callback", tmp_path, strategy="ddp_spawn", save_as="spawn-callback", **TWO_PROCESSES)
    rank0, rank1 = load_ranks(tmp_path, "spawn", "callback")
    assert_same(rank0["weights"], rank1["weights"])
    assert_same(rank0["weights"], single_device_32["reference"])
    assert_differ(rank0["weights"], single_device_32["baseline"])


@pytest.mark.distributed
@pytest.mark.parametrize("setting", ["ddp", "ddp-accumulate"])
def test_ddp_callback_trains_like_hand_written_penalty_under_ddp(setting, two_process_runs, single_device_32):
    callback = load_ranks(two_process_runs, setting, "callback")
    reference = load_ranks(two_process_runs, setting, "reference")
    assert_same(callback[0]["weights"], callback[1]["weights"])
    assert_same(callback[0]["weights"], reference[0]["weights"])
    if setting == "ddp":
        assert_same(reference[0]["weights"], single_device_32["reference"])
        assert_differ(callback[0]["weights"], load_ranks(two_process_runs, setting, "baseline")[0]["weights"])
    else:
        assert_differ(callback[0]["weights"], single_device_32["reference"])  # accumulation changed the steps


def _assert_sharded_outside_forward(record: dict, setting: str) -> None:
    full = record["weights"]
    for name, (kind, local_shape) in record["outside_forward"].items():
        assert local_shape != tuple(full[name].shape), f"{name} is not sharded outside forward: {kind} {local_shape}"
        if setting.startswith("fsdp2"):
            assert kind == "DTensor", name
        else:
            assert len(local_shape) == 1, f"{name} is not a flat shard: {local_shape}"


@pytest.mark.distributed
@pytest.mark.parametrize("setting", ["fsdp", "fsdp2"])
def test_sharded_strategy_trains_like_single_device_hand_written_penalty(setting, two_process_runs, single_device_32):
    """FSDP1 (Lightning's FSDPStrategy with Linear/Conv auto-wrapped, CPU subclass) and FSDP2
    (ModelParallelStrategy + fully_shard). A hand-written penalty in ``training_step`` is not a
    valid reference under them (it sees flat shards or DTensors), so the reference is the
    single-device run on the same global batches; weights are gathered in full on each rank."""
    callback = load_ranks(two_process_runs, setting, "callback")
    baseline = load_ranks(two_process_runs, setting, "baseline")
    _assert_sharded_outside_forward(callback[0], setting)
    assert_same(callback[0]["weights"], callback[1]["weights"])
    assert_same(callback[0]["weights"], single_device_32["reference"])
    assert_same(baseline[0]["weights"], single_device_32["baseline"])
    assert_differ(callback[0]["weights"], baseline[0]["weights"])


@pytest.mark.distributed
@pytest.mark.parametrize("setting", ["fsdp-pairs-shared", "fsdp2-pairs-shared"])
def test_pairs_shared_across_ranks_under_fsdp_train_like_the_whole_penalty(setting, two_process_runs, single_device_32):
    """``shard_across_ranks=True`` under FSDP1 and FSDP2: each rank computes half of the pairs on the
    gathered weights, scaled by 2, and the strategy's averaged gradient is the whole penalty's."""
    callback = load_ranks(two_process_runs, setting, "callback")
    _assert_sharded_outside_forward(callback[0], setting)
    assert_same(callback[0]["weights"], callback[1]["weights"])
    assert_same(callback[0]["weights"], single_device_32["reference"])


@pytest.mark.distributed
@pytest.mark.parametrize("setting", ["fsdp-shared", "fsdp2-shared"])
def test_layer_called_twice_under_sharding_is_penalised_once_per_step(setting, two_process_runs, tmp_path):
    """The shared layer is gathered again for its second call; the penalty still counts once."""
    callback = load_ranks(two_process_runs, setting, "callback")
    _assert_sharded_outside_forward(callback[0], setting)
    assert_same(callback[0]["weights"], callback[1]["weights"])
    assert_same(callback[0]["weights"], train("reference", tmp_path, model_cls=SharedLayerNet, batch_size=32))
