"""Faults during training: a killed run resumed mid-epoch, non-finite penalties, DDP agreement."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import TinyNet, assert_same_weights, trainer_kwargs, weights

from lightning_hsu import MHE, HypersphericalUniformity, NonFinitePenaltyError, Rule
from reliability.training import AtStep, FailAt, GatherOnEnd, ResumableNet

RULES = {
    "mhp": lambda: [
        Rule("mhp", 1.0, options={"half_space": True}, target="hidden"),
        Rule("mhp", 10.0, target="classifier"),
    ],
    "comhe": lambda: [Rule("comhe", 1.0, options={"projection_dim": 3, "projections": 4, "half_space": True})],
}
TOTAL_STEPS = 7  # 4 batches per epoch: the fault at step 3 is mid-epoch, the run crosses an epoch
FAULT_STEP = 3


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            _assert_same_state(value, b[key])
        elif isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, b[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert value == b[key], key


@pytest.mark.parametrize("kind", sorted(RULES))
def test_run_killed_mid_epoch_resumes_from_last_checkpoint_to_the_uninterrupted_result(tmp_path, kind):
    """An exception at step 3 (mid-epoch) kills the run; ``last.ckpt`` (saved every step) restores
    the weights, the optimiser, the callback's poles / projection counters and, through a loader
    with ``state_dict`` (:class:`~reliability.training.ResumableLoader`), the position in the epoch.
    The resumed run must end with exactly the weights and callback state of a run never killed."""
    full_cb = HypersphericalUniformity(rules=RULES[kind](), log=False)
    full = ResumableNet()
    pl.Trainer(callbacks=[full_cb], **trainer_kwargs(tmp_path / "full", max_steps=TOTAL_STEPS)).fit(full)

    def checkpointing() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)

    killed = pl.Trainer(
        callbacks=[HypersphericalUniformity(rules=RULES[kind](), log=False), checkpointing(), FailAt(FAULT_STEP)],
        **trainer_kwargs(tmp_path / "killed", max_steps=TOTAL_STEPS, enable_checkpointing=True),
    )
    with pytest.raises(RuntimeError, match="injected fault"):
        killed.fit(ResumableNet())
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == FAULT_STEP

    resumed_cb = HypersphericalUniformity(rules=RULES[kind](), log=False)
    resumed = ResumableNet()
    trainer = pl.Trainer(
        callbacks=[resumed_cb, checkpointing()],
        **trainer_kwargs(tmp_path / "resumed", max_steps=TOTAL_STEPS, enable_checkpointing=True),
    )
    trainer.fit(resumed, ckpt_path=last)

    assert trainer.global_step == TOTAL_STEPS
    assert_same_weights(weights(resumed), weights(full), atol=0.0)
    _assert_same_state(full_cb.state_dict(), resumed_cb.state_dict())


def _duplicate_classifier_rows(model: torch.nn.Module) -> None:
    model.fc.weight[1] = model.fc.weight[0]


def test_penalty_that_turns_nonfinite_is_caught_at_that_step_naming_the_layer(tmp_path):
    """Finite weights, non-finite penalty: a Riesz-60 energy of two duplicate neurons overflows
    float32. The rows are made duplicates at step 3; the error names the layer and the step and
    the weights keep their values from the start of that step."""
    corrupt = AtStep(3, _duplicate_classifier_rows)
    model = TinyNet()
    cb = HypersphericalUniformity(MHE(power=60.0), coefficient=1e-12, layers=["fc"], log=False)
    trainer = pl.Trainer(callbacks=[cb, corrupt], **trainer_kwargs(tmp_path, max_steps=5))
    with pytest.raises(NonFinitePenaltyError, match=r"layer 'fc' is (nan|inf) at global step 3"):
        trainer.fit(model)
    assert trainer.global_step == 3
    for name, value in model.state_dict().items():
        assert torch.equal(value, corrupt.before[name]), name


def _nan_hidden_weight(model: torch.nn.Module) -> None:
    model.hidden.weight[0, 0] = float("nan")


def test_nan_weight_is_reported_at_that_step_naming_the_layer(tmp_path):
    trainer = pl.Trainer(
        callbacks=[HypersphericalUniformity(MHE(), layers=["hidden"], log=False), AtStep(2, _nan_hidden_weight)],
        **trainer_kwargs(tmp_path, max_steps=4),
    )
    with pytest.raises(NonFinitePenaltyError, match=r"layer 'hidden'.*global step 2"):
        trainer.fit(TinyNet())


@pytest.mark.distributed
def test_ddp_ranks_keep_identical_weights_and_poles_with_mhp(tmp_path):
    """2 processes (``ddp_spawn``, gloo): each rank sees other batches and moves its own MHP poles;
    after 4 steps the gathered weights and poles of both ranks are bitwise equal."""
    out = tmp_path / "gathered.pt"
    cb = HypersphericalUniformity(preset="mhp", log=False)
    trainer = pl.Trainer(
        callbacks=[cb, GatherOnEnd(out, cb)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_steps=4),
    )
    trainer.fit(TinyNet())
    gathered = torch.load(out, weights_only=True)
    assert gathered["weights"].shape[0] == 2 and gathered["poles"].shape[0] == 2
    assert torch.equal(gathered["weights"][0], gathered["weights"][1])
    assert torch.equal(gathered["poles"][0], gathered["poles"][1])
    assert torch.isfinite(gathered["weights"]).all()
