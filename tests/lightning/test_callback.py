"""The callback's options: selection, schedules, lazy steps, logging, switching, bad input."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from models import TinyNet, assert_same_weights, mhe_reference, trainer_kwargs, weights
from torch import nn

from lightning_hsu import (
    MHE,
    Cosine,
    HypersphericalUniformity,
    LinearWarmup,
    NonFinitePenaltyError,
    Rule,
    StepDecay,
)
from lightning_hsu.functional import hyperspherical_energy, neurons_of
from lightning_hsu.regularizers import Regularizer


def fit(tmp_path, callback, model=None, **kw):
    model = model or TinyNet()
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, **kw))
    trainer.fit(model)
    return model, trainer


def energy(layer: nn.Module, half: bool = False) -> torch.Tensor:
    return hyperspherical_energy(neurons_of(layer), power=2.0, half_space=half)


# -- selection -------------------------------------------------------------------------------------
def test_preset_binds_hidden_half_space_and_classifier_full_space():
    cb = HypersphericalUniformity(preset="mhe")
    cb.engine.bind(TinyNet())
    got = {(b.layer_name, b.regularizer.half_space, b.rule.coefficient) for b in cb.engine.bindings}
    assert got == {("conv", True, 1.0), ("hidden", True, 1.0), ("fc", False, 10.0)}


def test_layers_by_glob_regex_type_and_exclusion():
    model = TinyNet()
    select = {
        "glob": Rule("mhe", layers=["h*"]),
        "regex": Rule("mhe", regex=r"^(conv|fc)$"),
        "type": Rule("mhe", layer_types=["Conv2d"]),
        "exclude": Rule("mhe", exclude=["conv", "fc"]),
        "classifier": Rule("mhe", target="classifier"),
        "hidden": Rule("mhe", target="hidden"),
    }
    expected = {
        "glob": ["hidden"],
        "regex": ["conv", "fc"],
        "type": ["conv"],
        "exclude": ["hidden"],
        "classifier": ["fc"],
        "hidden": ["conv", "hidden"],
    }
    for key, rule in select.items():
        cb = HypersphericalUniformity(rules=[rule])
        cb.engine.bind(model)
        assert [b.layer_name for b in cb.engine.bindings] == expected[key], key


def test_explicit_classifier_name_overrides_auto():
    cb = HypersphericalUniformity(rules=[Rule("mhe", target="classifier")], classifier="hidden")
    cb.engine.bind(TinyNet())
    assert [b.layer_name for b in cb.engine.bindings] == ["hidden"]


def test_single_rule_regularizer_object_and_options_train_like_hand_written(tmp_path):
    ref = TinyNet(penalty=lambda m: 0.3 * (energy(m.conv, True) + energy(m.hidden, True) + energy(m.fc, True)))
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    a, _ = fit(tmp_path, HypersphericalUniformity(MHE(half_space=True), coefficient=0.3))
    b, _ = fit(tmp_path, HypersphericalUniformity("mhe", coefficient=0.3, options={"half_space": True}))
    assert_same_weights(weights(a), weights(ref))
    assert_same_weights(weights(b), weights(ref))


# -- how much --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schedule", "factors"),
    [
        (LinearWarmup(4), [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]),
        (StepDecay(2, gamma=0.5), [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]),
        (Cosine(4), [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0, 0.0]),
    ],
)
def test_schedules_follow_their_formula(schedule, factors):
    assert [schedule(s) for s in range(6)] == pytest.approx(factors)


def test_schedule_reads_global_steps_so_accumulation_does_not_stretch_it(tmp_path):
    seen: list[int] = []

    class Spy(MHE):
        def penalty(self, neurons, *, step=None):
            seen.append(step)
            return super().penalty(neurons, step=step)

    fit(tmp_path, HypersphericalUniformity(Spy(), layers=["fc"]), accumulate_grad_batches=2, max_steps=2)
    assert seen == [0, 0, 1, 1]


def test_warmup_schedule_trains_like_hand_written_ramp(tmp_path):
    def ref_penalty(m):
        return (m.global_step / 2 if m.global_step < 2 else 1.0) * energy(m.fc)

    ref = TinyNet(penalty=ref_penalty)
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    model, _ = fit(tmp_path, HypersphericalUniformity("mhe", layers=["fc"], schedule=LinearWarmup(2)))
    assert_same_weights(weights(model), weights(ref))


def test_every_n_steps_applies_k_times_the_coefficient_on_every_kth_step(tmp_path):
    ref = TinyNet(penalty=lambda m: (3 * 0.5 * energy(m.fc)) if m.global_step % 3 == 0 else 0.0)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5)).fit(ref)
    model, _ = fit(tmp_path, HypersphericalUniformity("mhe", 0.5, layers=["fc"]), max_steps=5)
    assert not torch.allclose(weights(model)["fc.weight"], weights(ref)["fc.weight"])
    lazy, _ = fit(tmp_path, HypersphericalUniformity("mhe", 0.5, layers=["fc"], every_n_steps=3), max_steps=5)
    assert_same_weights(weights(lazy), weights(ref))


def test_disabled_at_run_time_trains_like_no_callback(tmp_path):
    base = TinyNet()
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(base)
    cb = HypersphericalUniformity(preset="mhe")
    cb.enabled = False
    model, _ = fit(tmp_path, cb)
    assert_same_weights(weights(model), weights(base))


def test_switching_on_mid_training_from_another_callback(tmp_path):
    cb = HypersphericalUniformity("mhe", layers=["fc"], enabled=False)

    class SwitchOn(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            cb.enabled = trainer.global_step >= 2

    ref = TinyNet(penalty=lambda m: energy(m.fc) if m.global_step >= 2 else 0.0)
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    model = TinyNet()
    pl.Trainer(callbacks=[SwitchOn(), cb], **trainer_kwargs(tmp_path)).fit(model)
    assert_same_weights(weights(model), weights(ref))


def test_dict_output_of_training_step_gets_the_penalty(tmp_path):
    class DictNet(TinyNet):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx), "extra": 1}

    ref = TinyNet(penalty=mhe_reference())
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    model, _ = fit(tmp_path, HypersphericalUniformity(preset="mhe"), model=DictNet())
    assert_same_weights(weights(model), weights(ref))


# -- logging ---------------------------------------------------------------------------------------
def test_logs_total_and_per_layer_penalties_to_the_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    fit(tmp_path, HypersphericalUniformity(preset="mhe"), logger=logger, log_every_n_steps=1)
    logger.finalize("success")
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    keys = set(rows[0])
    assert {"hsu/penalty", "hsu/penalty/conv", "hsu/penalty/hidden", "hsu/penalty/fc"} <= keys
    last = [r for r in rows if r["hsu/penalty"]][-1]
    per_layer = {k: float(last[k]) for k in keys if k.startswith("hsu/penalty/")}
    weighted = per_layer["hsu/penalty/conv"] + per_layer["hsu/penalty/hidden"] + 10 * per_layer["hsu/penalty/fc"]
    assert float(last["hsu/penalty"]) == pytest.approx(weighted, rel=1e-5)


class TwoRegularizers(Regularizer):
    """A second regularizer name on a layer (for the naming test)."""

    name = "norm"

    def penalty(self, neurons, *, step=None):
        return (neurons.norm(dim=1) - 1).square().mean()


@pytest.mark.parametrize(
    ("callback", "expected"),
    [
        (lambda: HypersphericalUniformity("mhe", layers=["conv", "hidden", "fc"]), None),
        (lambda: HypersphericalUniformity(preset="mhe"), None),
        (
            lambda: HypersphericalUniformity(
                rules=[Rule("mhe", layers=["conv", "hidden"], name="my_hidden"), Rule("mhe", 2.0, layers=["fc"])]
            ),
            None,
        ),
        (
            lambda: HypersphericalUniformity(
                rules=[Rule("mhe", layers=["conv"]), Rule(TwoRegularizers(), layers=["conv"])]
            ),
            {"hsu/penalty/conv/mhe", "hsu/penalty/conv/norm"},
        ),
    ],
    ids=["single-rule", "preset", "custom-rules", "two-regularizers-on-one-layer"],
)
def test_penalty_names_do_not_depend_on_how_the_rules_are_written(tmp_path, monkeypatch, callback, expected):
    """`hsu/penalty/<layer>` whatever the rules' names; `/<regularizer>` added only where a layer has several."""
    logged: set[str] = set()
    original = pl.LightningModule.log

    def spy(self, name, *args, **kwargs):
        logged.add(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", spy)
    fit(tmp_path, callback(), max_steps=1, log_every_n_steps=1)
    penalties = {k for k in logged if k.startswith("hsu/penalty/")}
    assert penalties == (expected or {"hsu/penalty/conv", "hsu/penalty/hidden", "hsu/penalty/fc"})
    assert "hsu/penalty" in logged


def test_coefficient_follows_a_linear_warmup(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    schedule = LinearWarmup(warmup_steps=4)
    callback = HypersphericalUniformity("mhe", coefficient=0.5, schedule=schedule, layers=["fc"])
    fit(tmp_path, callback, logger=logger, log_every_n_steps=1, max_steps=6)
    logger.finalize("success")
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("hsu/coefficient/mhe")]
    logged = {int(r["step"]): float(r["hsu/coefficient/mhe"]) for r in rows}
    assert sorted(logged) == list(range(6))
    for step, value in logged.items():
        assert value == pytest.approx(0.5 * schedule(step)), step
    assert logged[0] == 0.0 and logged[5] == pytest.approx(0.5)  # the ramp, then λ


def test_configuration_is_logged_once_as_hyperparameters(tmp_path):
    calls: list[dict] = []

    class Spy(CSVLogger):
        def log_hyperparams(self, params, *args, **kwargs):
            calls.append(dict(params) if isinstance(params, dict) else {})
            return super().log_hyperparams(params, *args, **kwargs)

    rules = [Rule("mhe", 0.5, layers=["fc"], schedule=LinearWarmup(3)), Rule("mhs", 0.1, layers=["conv"])]
    fit(tmp_path, HypersphericalUniformity(rules=rules, every_n_steps=2), logger=Spy(tmp_path, name="run"))
    ours = [c for c in calls if any(k.startswith("hsu/") for k in c)]
    assert len(ours) == 1
    params = ours[0]
    assert params["hsu/every_n_steps"] == 2
    assert params["hsu/rule/mhe/coefficient"] == 0.5 and params["hsu/rule/mhs/coefficient"] == 0.1
    assert params["hsu/rule/mhe/regularizer"] == "mhe" and "LinearWarmup" in params["hsu/rule/mhe/schedule"]


def test_validation_and_prediction_compute_no_penalty(tmp_path):
    calls: list[bool] = []

    class Spy(MHE):
        def penalty(self, neurons, *, step=None):
            calls.append(torch.is_grad_enabled())
            return super().penalty(neurons, step=step)

    cb = HypersphericalUniformity(Spy(), layers=["fc"])
    model = TinyNet()
    trainer = pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path, limit_val_batches=2, num_sanity_val_steps=2))
    trainer.fit(model)
    assert len(calls) == 4  # one per training step, none in sanity check or validation
    trainer.validate(model, verbose=False)
    trainer.predict(model, dataloaders=model.val_dataloader())
    assert len(calls) == 4


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regularizer": "mhx"}, "unknown regularizer 'mhx'"),
        ({"regularizer": "mhe", "coefficient": -1.0}, "`coefficient` must be a finite number >= 0"),
        ({"regularizer": "mhe", "coefficient": float("nan")}, "`coefficient`"),
        ({"regularizer": "mhe", "options": {"power": -2}}, "`power`"),
        ({"regularizer": "mhe", "options": {"bogus": 1}}, "bogus"),
        ({"regularizer": "rmhp", "options": {"half_space": True}}, "R-MHP has no half-space form"),
        ({"preset": "nope"}, "unknown preset 'nope'"),
        ({"regularizer": "mhe", "every_n_steps": 0}, "`every_n_steps`"),
        ({"regularizer": "mhe", "on_nonfinite": "ignore"}, "`on_nonfinite`"),
        ({"layers": ["fc"]}, "single rule of `regularizer`"),
        ({"rules": [Rule("mhe", regex="(")]}, "not a valid regular expression"),
    ],
)
def test_invalid_options_are_refused_at_construction_naming_the_option(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace("[", r"\[")):
        HypersphericalUniformity(**kwargs)


class OneNeuron(TinyNet):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 1)


class Frozen(TinyNet):
    def __init__(self):
        super().__init__()
        self.hidden.requires_grad_(False)


@pytest.mark.parametrize(
    ("callback", "model", "message"),
    [
        (lambda: HypersphericalUniformity("mhe", layers=["decoder.*"]), TinyNet, "no layer matches `layers` pattern"),
        (lambda: HypersphericalUniformity("mhe", layers=["act"]), TinyNet, "layer 'act' \\(ReLU\\) has no tensor"),
        (lambda: HypersphericalUniformity("mhe", layers=["fc"]), OneNeuron, "layer 'fc' has 1 neuron"),
        (lambda: HypersphericalUniformity("mhe", layers=["hidden"]), Frozen, "left out: hidden: frozen"),
        (
            lambda: HypersphericalUniformity(rules=[Rule("mhe", 1.0), Rule("mhe", 2.0, layers=["fc"])]),
            TinyNet,
            "layer 'fc' gets regularizer 'mhe' from two different rules",
        ),
        (
            lambda: HypersphericalUniformity(rules=[Rule("mhe", target="classifier")], classifier="head"),
            TinyNet,
            "classifier layer 'head' is not a module",
        ),
    ],
)
def test_bad_layer_selection_is_refused_in_setup_before_any_step(tmp_path, callback, model, message):
    steps: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    trainer = pl.Trainer(callbacks=[callback(), Count()], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=message):
        trainer.fit(model())
    assert steps == []


def test_identical_rules_on_one_layer_are_applied_once(tmp_path):
    ref = TinyNet(penalty=lambda m: energy(m.fc))
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(ref)
    cb = HypersphericalUniformity(rules=[Rule("mhe", layers=["fc"]), Rule("mhe", layers=["f*"])])
    model, _ = fit(tmp_path, cb)
    assert_same_weights(weights(model), weights(ref))


class Exploding(Regularizer):
    name = "exploding"

    def penalty(self, neurons, *, step=None):
        return neurons.sum() * (float("nan") if step == 2 else 0.0)


def test_nonfinite_penalty_raises_naming_layer_and_step_before_weights_change(tmp_path):
    seen: dict[int, torch.Tensor] = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.global_step] = pl_module.fc.weight.detach().clone()

    model = TinyNet()
    trainer = pl.Trainer(
        callbacks=[HypersphericalUniformity(Exploding(), layers=["fc"]), Snapshot()], **trainer_kwargs(tmp_path)
    )
    with pytest.raises(NonFinitePenaltyError, match="layer 'fc' is nan at global step 2"):
        trainer.fit(model)
    assert torch.isfinite(model.fc.weight).all()
    assert torch.equal(model.fc.weight, seen[2])


def test_nonfinite_penalty_can_be_skipped_on_request(tmp_path):
    base = TinyNet()
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(base)
    with pytest.warns(RuntimeWarning, match="skipped"):
        model, _ = fit(tmp_path, HypersphericalUniformity(Exploding(), layers=["fc"], on_nonfinite="skip"))
    assert_same_weights(weights(model), weights(base))


def test_per_layer_values_are_logged_on_the_steps_the_loggers_write(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    fit(tmp_path, HypersphericalUniformity(preset="mhe"), logger=logger, log_every_n_steps=2, max_steps=6)
    logger.finalize("success")
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("hsu/penalty")]
    # Lightning writes steps 1, 3, 5 (every 2nd); each row holds the total and every layer's value
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    for row in rows:
        assert all(row[k] for k in ("hsu/penalty/conv", "hsu/penalty/hidden", "hsu/penalty/fc"))


def test_per_layer_values_are_not_logged_on_steps_the_loggers_skip(tmp_path, monkeypatch):
    logged: list[str] = []
    original = pl.LightningModule.log

    def spy(self, name, *args, **kwargs):
        logged.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", spy)
    fit(tmp_path, HypersphericalUniformity(preset="mhe"), log_every_n_steps=3, max_steps=6)
    assert logged.count("hsu/penalty") == 6  # every step (progress bar, callback_metrics)
    assert logged.count("hsu/penalty/fc") == 2  # the loggers' steps only: 3 and 6


def test_manual_optimisation_warning_is_given_on_global_rank_zero_only(monkeypatch):
    """Through `rank_zero_warn`: a 2-process run warns once, not once per rank."""
    import warnings
    from types import SimpleNamespace

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from lightning_hsu.lightning_adapter import run_training_step

    def step_without_penalty() -> None:
        engine = SimpleNamespace(in_step=False, enabled=True, manual_calls=0, warned_manual=False)
        module = SimpleNamespace(_trainer=object(), automatic_optimization=False)
        run_training_step(engine, module, lambda: None, (), {}, "Net")

    monkeypatch.setattr(rank_zero_only, "rank", 0)
    with pytest.warns(UserWarning, match="did not take the hyperspherical penalty"):
        step_without_penalty()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_without_penalty()
