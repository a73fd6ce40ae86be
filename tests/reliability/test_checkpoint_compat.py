"""Checkpoint compatibility: ``weights_only`` loading, and resuming across runs with and without
the callback."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from models import TinyNet, trainer_kwargs

from lightning_hsu import HypersphericalUniformity, Rule


def _callback() -> HypersphericalUniformity:
    return HypersphericalUniformity(
        rules=[
            Rule("mhp", 1.0, options={"half_space": True}, target="hidden"),
            Rule("comhe", 10.0, options={"projection_dim": 3, "projections": 2}, target="classifier"),
        ],
        log=False,
    )


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


@pytest.fixture
def ckpt_with_callback(tmp_path):
    trainer = pl.Trainer(callbacks=[_callback()], **trainer_kwargs(tmp_path / "a", max_steps=2))
    trainer.fit(TinyNet())
    path = tmp_path / "with.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_checkpoint_with_poles_and_counters_loads_with_weights_only(ckpt_with_callback):
    ckpt = torch.load(ckpt_with_callback, weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("HypersphericalUniformity")]
    assert set(state["regularizers"]) == {"conv/mhp", "hidden/mhp", "fc/comhe"}
    assert state["regularizers"]["fc/comhe"] == {"calls": 2}
    for leaf in _leaves(state):
        assert isinstance(leaf, (torch.Tensor, int, float, bool, str, type(None))), type(leaf)


def test_checkpoint_with_the_callback_resumes_in_a_plain_run_with_a_warning(tmp_path, ckpt_with_callback):
    """Lightning warns that the checkpoint holds state of a callback the trainer lacks, and trains on."""
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", max_steps=4))
    with pytest.warns(UserWarning, match=r"Please add the following callbacks: \[\"HypersphericalUniformity"):
        trainer.fit(TinyNet(), ckpt_path=ckpt_with_callback)
    assert trainer.global_step == 4


def test_checkpoint_without_the_callback_resumes_with_it_silently_and_fresh_poles(tmp_path):
    """No warning: there is no state to restore, so the callback starts as in a fresh run: poles
    drawn from their seed at the first resumed step, CoMHE's counter at 0."""
    plain = pl.Trainer(**trainer_kwargs(tmp_path / "a", max_steps=2))
    plain.fit(TinyNet())
    path = tmp_path / "without.ckpt"
    plain.save_checkpoint(path)

    callback = _callback()
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path / "b", max_steps=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyNet(), ckpt_path=path)
    mentions = [str(w.message) for w in caught if "hyperspherical" in str(w.message).lower()]
    assert mentions == []
    assert trainer.global_step == 4
    state = callback.state_dict()["regularizers"]
    assert state["fc/comhe"] == {"calls": 2}  # the two resumed steps only
    for key in ("conv/mhp", "hidden/mhp"):
        assert state[key]["last_step"] == 3 and torch.isfinite(state[key]["pole"]).all()
