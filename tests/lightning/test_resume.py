"""Resume: everything stateful (poles, their optimiser state, projection draws) is checkpointed."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from models import TinyNet, assert_same_weights, trainer_kwargs, weights

from lightning_hsu import HypersphericalUniformity, Rule

RULES = {
    "mhp": lambda: [
        Rule("mhp", 1.0, options={"half_space": True}, target="hidden"),
        Rule("mhp", 10.0, target="classifier"),
    ],
    "mhc": lambda: [Rule("mhc", 0.1, target="all")],
    "comhe": lambda: [Rule("comhe", 1.0, options={"projection_dim": 3, "projections": 4, "half_space": True})],
}


def _callback(kind: str) -> HypersphericalUniformity:
    return HypersphericalUniformity(rules=RULES[kind](), log=False)


@pytest.mark.parametrize("kind", sorted(RULES))
def test_resumed_run_ends_with_the_weights_of_the_uninterrupted_run(tmp_path, kind):
    full_cb = _callback(kind)
    full = TinyNet()
    pl.Trainer(callbacks=[full_cb], **trainer_kwargs(tmp_path / "full", max_steps=-1, max_epochs=2)).fit(full)

    first = TinyNet()
    trainer = pl.Trainer(callbacks=[_callback(kind)], **trainer_kwargs(tmp_path / "a", max_steps=-1, max_epochs=1))
    trainer.fit(first)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed_cb = _callback(kind)
    resumed = TinyNet()
    resumed_trainer = pl.Trainer(callbacks=[resumed_cb], **trainer_kwargs(tmp_path / "b", max_steps=-1, max_epochs=2))
    resumed_trainer.fit(resumed, ckpt_path=ckpt)

    assert_same_weights(weights(resumed), weights(full), atol=1e-6)
    a, b = full_cb.state_dict(), resumed_cb.state_dict()
    assert a.keys() == b.keys() and a["regularizers"].keys() == b["regularizers"].keys()
    for key, state in a["regularizers"].items():
        for field, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, b["regularizers"][key][field])


def test_checkpoint_with_poles_loads_with_weights_only(tmp_path):
    trainer = pl.Trainer(callbacks=[_callback("mhp")], **trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(TinyNet())
    trainer.save_checkpoint(tmp_path / "p.ckpt")
    ckpt = torch.load(tmp_path / "p.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("HypersphericalUniformity")]
    assert set(state["regularizers"]) == {"conv/mhp", "hidden/mhp", "fc/mhp"}
    assert state["regularizers"]["fc/mhp"]["pole"].shape == (8,)
    assert "momentum_buffer" in state["regularizers"]["fc/mhp"]["optimizer"]["state"][0]


def test_pole_state_without_matching_layer_warns_instead_of_crashing(tmp_path):
    trainer = pl.Trainer(callbacks=[_callback("mhp")], **trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(TinyNet())
    ckpt = tmp_path / "p.ckpt"
    trainer.save_checkpoint(ckpt)
    other = HypersphericalUniformity(rules=[Rule("mhp", layers=["fc"])], log=False)
    data = torch.load(ckpt, weights_only=True)
    (key,) = [k for k in data["callbacks"] if k.startswith("HypersphericalUniformity")]
    data["callbacks"][other.state_key] = data["callbacks"].pop(key)
    torch.save(data, ckpt)
    with pytest.warns(UserWarning, match="does not match any regularised layer"):
        pl.Trainer(callbacks=[other], **trainer_kwargs(tmp_path, max_steps=3)).fit(TinyNet(), ckpt_path=ckpt)
