"""Configuration fuzzing of ``HypersphericalUniformity``: random mixes of valid and invalid options.

An oracle written from the documented rules knows which options of a drawn configuration are
invalid. Every invalid configuration must be refused at construction or in ``setup`` (before the
first training batch) with a message naming at least one of the offending options or layers; every
valid one must train ``TinyNet`` for one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import TinyNet, trainer_kwargs

from lightning_hsu import Cosine, HypersphericalUniformity, LinearWarmup, Rule, StepDecay

FUZZ = settings.get_profile("reliability-training")
NAN, INF = float("nan"), float("inf")

# Per regularizer: option -> (valid values, invalid values). The message must name the option.
_HALF = ([True, False], ["yes", 1])
_CHUNK = ([None, 2], [0, 2.5])
OPTIONS: dict[str, dict[str, tuple[list[Any], list[Any]]]] = {
    "mhe": {
        "power": ([0.0, 1, 2.0], [-1.0, NAN, "2"]),
        "distance": (["euclidean", "angular"], ["cosine"]),
        "half_space": _HALF,
        "chunk_size": _CHUNK,
        "eps": ([1e-4], [0.0, -1e-4]),
    },
    "mhs": {"half_space": _HALF, "temperature": ([None, 0.1], [0.0, -0.1, NAN]), "chunk_size": _CHUNK},
    "mhp": {
        "half_space": _HALF,
        "inner_steps": ([1, 3], [0, 2.0]),
        "pole_lr": ([0.1], [0.0, -1.0, INF]),
        "pole_momentum": ([0.0, 0.9], [-0.1]),
        "seed": ([0, 7], [1.5, True]),
    },
    "mhc": {"gamma": ([10.0, 1], [0.0, INF]), "half_space": _HALF, "inner_steps": ([2], [-1])},
    "mgd": {"half_space": _HALF, "jitter": ([1e-6], [0.0, -1.0])},
    "rmhp": {"half_space": ([], [True, False])},  # R-MHP takes no options at all
    "comhe": {
        "projection_dim": ([2, 3], [0]),
        "projections": ([2], [0, 1.5]),
        "half_space": _HALF,
        "resample": ([True, False], ["no"]),
    },
    "uniformity": {"t": ([2.0], [0.0, NAN]), "half_space": _HALF, "chunk_size": _CHUNK},
}
SLOTS = ("regularizer", "option", "coefficient", "layers", "exclude", "target", "classifier", "every_n_steps")
SLOTS += ("on_nonfinite", "schedule")
MODULES = ("conv", "act", "hidden", "fc")
WEIGHTED = ("conv", "hidden", "fc")  # act (ReLU) has no weight


@dataclass
class Config:
    form: str  # "single" (callback arguments) or "rules" (a Rule, with a target)
    regularizer: Any
    options: dict[str, Any]
    coefficient: Any
    layers: Any
    exclude: Any
    target: Any
    classifier: Any
    every_n_steps: Any
    on_nonfinite: Any
    schedule: tuple | str | None
    problems: list[str] = field(default_factory=list)  # what a refusal must name (any of them)


def _schedule(spec: tuple | str | None):
    if spec is None or isinstance(spec, str):
        return spec
    cls = {"LinearWarmup": LinearWarmup, "StepDecay": StepDecay, "Cosine": Cosine}[spec[0]]
    return cls(*spec[1:])


def _selected(cfg: Config) -> set[str]:
    """The layers the rule would select (the oracle), or raise KeyError-free set logic."""
    if cfg.layers is None:
        chosen = set(WEIGHTED)
    else:
        import fnmatch

        chosen = set()
        for name in MODULES:
            exact = name in cfg.layers
            if exact or (any(fnmatch.fnmatchcase(name, p) for p in cfg.layers) and name in WEIGHTED):
                chosen.add(name)
    chosen -= set(cfg.exclude or [])
    classifier = "fc" if cfg.classifier == "auto" else cfg.classifier
    if cfg.target == "hidden":
        chosen.discard(classifier)
    elif cfg.target == "classifier":
        chosen &= {classifier}
    return chosen


@st.composite
def configs(draw: st.DrawFn) -> Config:
    bad = draw(st.integers(0, 2), label="number of invalid options (before interactions)")
    slots = draw(
        st.lists(
            st.sampled_from(SLOTS),
            min_size=bad,
            max_size=bad,
            unique=True,
        )
    )
    problems: list[str] = []
    form = draw(st.sampled_from(["single", "rules"]))

    name = draw(st.sampled_from(sorted(OPTIONS)))
    regularizer: Any = name.upper() if draw(st.booleans()) else name
    if "regularizer" in slots:
        regularizer = draw(st.sampled_from(["mhx", "", "MH E"]))
        problems.append("regularizer")
    options: dict[str, Any] = {}
    table = OPTIONS[name]
    for option, (good, _) in table.items():
        if good and draw(st.booleans()):
            options[option] = draw(st.sampled_from(good))
    if "option" in slots:
        option = draw(st.sampled_from([*table, "bogus"]))
        options[option] = 1 if option == "bogus" else draw(st.sampled_from(table[option][1]))
        problems.append(option)

    def pick(slot: str, good: list[Any], bad_values: list[Any], token: str) -> Any:
        if slot in slots:
            problems.append(token)
            return draw(st.sampled_from(bad_values))
        return draw(st.sampled_from(good))

    coefficient = pick("coefficient", [0.0, 0.5, 1, 10.0], [-1.0, NAN, INF, -INF, "1", True], "coefficient")
    layers = pick("layers", [None, ["fc"], ["h*"], ["conv", "fc"], ["*"]], [["decoder.*"], "fc"], "layers")
    if "layers" in slots and layers == ["decoder.*"]:
        problems[-1] = "decoder"
    # A string `exclude` is only drawn for a Rule: the callback's own argument splits it into
    # characters (see test_a_string_exclude_is_refused_by_the_callback below).
    if form == "single" and "exclude" in slots:
        slots.remove("exclude")
    exclude = pick("exclude", [[], ["conv"]], ["conv"], "exclude")
    target = pick("target", ["all", "hidden", "classifier"], ["everything"], "target") if form == "rules" else "all"
    classifier = pick("classifier", ["auto", "fc", "hidden", None], ["head"], "head")
    every_n_steps = pick("every_n_steps", [1, 2, 3], [0, -1, 1.5, True], "every_n_steps")
    on_nonfinite = pick("on_nonfinite", ["raise", "skip"], ["ignore", None], "on_nonfinite")
    schedule = pick(
        "schedule",
        [None, ("LinearWarmup", 3), ("StepDecay", 2, 0.5), ("Cosine", 10)],
        [("LinearWarmup", 0), ("Cosine", -5), ("StepDecay", 2, NAN), "linear"],
        "schedule",
    )
    if "schedule" in slots:
        problems[-1] = {"LinearWarmup": "warmup_steps", "Cosine": "total_steps", "StepDecay": "gamma"}.get(
            schedule[0] if isinstance(schedule, tuple) else "", "schedule"
        )
    cfg = Config(
        form, regularizer, options, coefficient, layers, exclude, target, classifier, every_n_steps,
        on_nonfinite, schedule, problems,
    )  # fmt: skip
    # Interactions the per-option draw cannot see: a selection that comes out empty or that
    # names a module without a weight (only when the selection options themselves are valid).
    if not {"layers", "exclude", "target", "classifier"} & set(slots):
        chosen = _selected(cfg)
        if not chosen:
            problems.append("no layer")
        elif "act" in chosen:
            problems.append("'act'")
    return cfg


def _build(cfg: Config) -> HypersphericalUniformity:
    common = dict(classifier=cfg.classifier, every_n_steps=cfg.every_n_steps, on_nonfinite=cfg.on_nonfinite, log=False)
    if cfg.form == "single":
        return HypersphericalUniformity(
            cfg.regularizer,
            coefficient=cfg.coefficient,
            options=cfg.options,
            layers=cfg.layers,
            exclude=cfg.exclude,
            schedule=_schedule(cfg.schedule),
            **common,
        )
    rule = Rule(
        cfg.regularizer,
        cfg.coefficient,
        options=cfg.options,
        layers=cfg.layers,
        exclude=cfg.exclude,
        target=cfg.target,
        schedule=_schedule(cfg.schedule),
    )
    return HypersphericalUniformity(rules=[rule], **common)


class _CountBatches(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


def _names_a_problem(message: str, cfg: Config) -> bool:
    return any(p.lower() in message.lower() for p in cfg.problems)


@settings(FUZZ)
@given(cfg=configs())
def test_invalid_configurations_are_refused_before_training_and_valid_ones_train(tmp_path, cfg):
    try:
        callback = _build(cfg)
    except (ValueError, TypeError) as err:
        assert cfg.problems, f"a valid configuration was refused at construction: {err}"
        assert _names_a_problem(str(err), cfg), f"{err!s} does not name any of {cfg.problems}"
        return
    count = _CountBatches()
    trainer = pl.Trainer(callbacks=[callback, count], **trainer_kwargs(tmp_path, max_steps=1))
    if cfg.problems:
        with pytest.raises((ValueError, TypeError)) as info:
            trainer.fit(TinyNet())
        assert count.batches == 0, "refused only after a training batch"
        assert _names_a_problem(str(info.value), cfg), f"{info.value!s} does not name any of {cfg.problems}"
        return
    model = TinyNet()
    trainer.fit(model)
    assert trainer.global_step == 1
    assert all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters())


def test_a_string_exclude_is_refused_by_the_callback():
    with pytest.raises(ValueError, match="`exclude`"):
        HypersphericalUniformity("mhe", exclude="conv")
