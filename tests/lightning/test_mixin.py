"""The mixin: rules declared in the module, the penalty taken by hand, manual optimisation."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from models import TinyNet, assert_same_weights, mhe_reference, trainer_kwargs, weights
from torch import nn
from torch.utils.data import DataLoader

from lightning_hsu import HypersphericalUniformity, HypersphericalUniformityMixin, hyperspherical_penalty
from lightning_hsu.functional import hyperspherical_energy, hyperspherical_separation, neurons_of

PAPER_RULES = [
    {"regularizer": "mhe", "coefficient": 1.0, "options": {"half_space": True}, "target": "hidden"},
    {"regularizer": "mhe", "coefficient": 10.0, "target": "classifier"},
]


class MixinNet(HypersphericalUniformityMixin, TinyNet):
    def __init__(self, hsu_rules=PAPER_RULES, take_penalty: bool = True, weight: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.configure_hyperspherical(rules=hsu_rules)

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.hparams.take_penalty:
            loss = loss + self.hparams.weight * self.hyperspherical_penalty()
        return loss


def test_mixin_penalty_taken_in_training_step_matches_hand_written(tmp_path):
    ref = TinyNet(penalty=mhe_reference())
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    model = MixinNet()
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(model)
    assert_same_weights(weights(model), weights(ref))


def test_mixin_adds_the_penalty_when_training_step_does_not_take_it(tmp_path):
    ref = TinyNet(penalty=mhe_reference())
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    model = MixinNet(take_penalty=False)
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(model)
    assert_same_weights(weights(model), weights(ref))


def test_mixin_custom_weighting_is_applied_once(tmp_path):
    ref = TinyNet(penalty=lambda m: 0.5 * mhe_reference()(m))
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    model = MixinNet(weight=0.5)
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(model)
    assert_same_weights(weights(model), weights(ref))


class Sub(MixinNet):
    def training_step(self, batch, batch_idx):  # type: ignore[override]
        return super().training_step(batch, batch_idx)


def test_subclass_calling_super_training_step_applies_penalty_once(tmp_path):
    ref = TinyNet(penalty=mhe_reference())
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    model = Sub(take_penalty=False)
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(model)
    assert_same_weights(weights(model), weights(ref))


def test_mixin_rules_are_saved_as_plain_hyperparameters(tmp_path):
    model = MixinNet()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, enable_checkpointing=True, max_steps=1))
    trainer.fit(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["hsu_rules"] == PAPER_RULES
    restored = MixinNet.load_from_checkpoint(path)
    assert [r.label for r in restored.hyperspherical_engine.rules] == ["mhe", "mhe"]


class GAN(HypersphericalUniformityMixin, pl.LightningModule):
    """Two optimizers, manual optimisation: each step's penalty reaches only its own layers."""

    def __init__(self, with_penalty: bool = True) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
        self.disc = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
        self.with_penalty = with_penalty
        self.configure_hyperspherical(
            rules=[
                {"regularizer": "mhe", "coefficient": 1.0, "layers": ["gen.*"]},
                {"regularizer": "mhs", "coefficient": 0.5, "layers": ["disc.0"]},
            ],
            classifier=None,
        )

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        z = x[:, :4]
        self.toggle_optimizer(opt_g)
        g_loss = -self.disc(self.gen(z)).mean()
        if self.with_penalty:
            g_loss = g_loss + self.hyperspherical_penalty(opt_g)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        d_loss = self.disc(self.gen(z).detach()).mean() - self.disc(x).mean()
        if self.with_penalty:
            d_loss = d_loss + self.hyperspherical_penalty(opt_d)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):  # type: ignore[override]
        return torch.optim.SGD(self.gen.parameters(), lr=0.1), torch.optim.SGD(self.disc.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=torch.Generator().manual_seed(0)))
        return DataLoader(data, batch_size=8)


def _gan_reference_step(model: GAN, x: torch.Tensor, opt_g, opt_d) -> None:
    z = x[:, :4]
    for p in model.disc.parameters():
        p.requires_grad_(False)
    pen_g = hyperspherical_energy(neurons_of(model.gen[0])) + hyperspherical_energy(neurons_of(model.gen[2]))
    g_loss = -model.disc(model.gen(z)).mean() + pen_g
    opt_g.zero_grad()
    g_loss.backward()
    opt_g.step()
    for p in model.disc.parameters():
        p.requires_grad_(True)
    for p in model.gen.parameters():
        p.requires_grad_(False)
    d_loss = model.disc(model.gen(z).detach()).mean() - model.disc(x).mean()
    d_loss = d_loss + 0.5 * hyperspherical_separation(neurons_of(model.disc[0]))
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    for p in model.gen.parameters():
        p.requires_grad_(True)


def test_manual_optimisation_with_two_optimizers_penalises_only_the_stepped_layers(tmp_path):
    model = GAN()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, max_steps=-1)).fit(model)
    ref = GAN(with_penalty=False)
    opt_g, opt_d = ref.configure_optimizers()
    for (x,) in ref.train_dataloader():
        _gan_reference_step(ref, x, opt_g, opt_d)
    assert_same_weights(weights(model), weights(ref))
    unregularised = GAN(with_penalty=False)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, max_steps=-1)).fit(unregularised)
    assert not torch.allclose(weights(model)["gen.0.weight"], weights(unregularised)["gen.0.weight"])


class ManualNet(TinyNet):
    def __init__(self, take: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.take = take

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.take:
            loss = loss + hyperspherical_penalty(self, opt)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_callback_with_manual_optimisation_uses_the_helper(tmp_path):
    ref = TinyNet(penalty=mhe_reference())
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    model = ManualNet(take=True)
    pl.Trainer(callbacks=[HypersphericalUniformity(preset="mhe")], **trainer_kwargs(tmp_path)).fit(model)
    assert_same_weights(weights(model), weights(ref))


def test_manual_optimisation_without_the_helper_warns_once(tmp_path):
    model = ManualNet(take=False)
    with pytest.warns(UserWarning, match="manual optimisation") as record:
        pl.Trainer(callbacks=[HypersphericalUniformity(preset="mhe")], **trainer_kwargs(tmp_path)).fit(model)
    assert sum("manual optimisation" in str(w.message) for w in record) == 1


def test_callback_and_mixin_never_apply_the_same_rule_twice(tmp_path):
    ref = TinyNet(penalty=mhe_reference())
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    model = MixinNet(take_penalty=False)
    with pytest.warns(UserWarning, match="does not apply it again"):
        pl.Trainer(callbacks=[HypersphericalUniformity(preset="mhe")], **trainer_kwargs(tmp_path)).fit(model)
    assert_same_weights(weights(model), weights(ref))


def test_callback_and_mixin_with_conflicting_settings_is_an_error(tmp_path):
    model = MixinNet(take_penalty=False)
    trainer = pl.Trainer(callbacks=[HypersphericalUniformity("mhe", coefficient=3.0)], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="both from the module's rules and from"):
        trainer.fit(model)


def test_penalty_helper_without_any_rules_is_a_clear_error(tmp_path):
    model = ManualNet(take=True)
    with pytest.raises(RuntimeError, match="no hyperspherical regularisation is attached"):
        pl.Trainer(**trainer_kwargs(tmp_path)).fit(model)


def test_callback_and_mixin_rules_differing_only_in_schedule_is_an_error(tmp_path):
    """A schedule is part of a rule: the callback's warm-up must not be dropped as a duplicate of
    the mixin's constant rule (it was, when the overlap check compared coefficients only)."""
    from lightning_hsu import LinearWarmup, Rule

    model = MixinNet(take_penalty=False)
    rules = [
        Rule("mhe", 1.0, options={"half_space": True}, target="hidden", schedule=LinearWarmup(10)),
        Rule("mhe", 10.0, target="classifier"),
    ]
    trainer = pl.Trainer(callbacks=[HypersphericalUniformity(rules=rules)], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"layer 'conv' gets 'mhe' both .* different settings"):
        trainer.fit(model)
