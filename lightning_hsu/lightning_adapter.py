"""The thin Lightning layer over `PenaltyEngine`, shared by the
callback and the mixin: installing the engine on a LightningModule, wrapping ``training_step``
so the penalty joins the loss, the manual-optimisation helper, and logging."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_hsu.engine import PenaltyEngine
from lightning_hsu.rules import Binding, Rule, same_rule

#: Attribute of a LightningModule holding the engines attached to it (callback and/or mixin).
ENGINES_ATTR = "_hsu_engines"


def _strategy_types(name: str) -> tuple[type, ...]:
    """Lightning's strategy class ``name`` from every installed namespace (``lightning.pytorch``,
    ``pytorch_lightning``), so that either trainer's strategies match by type."""
    found = []
    for namespace in ("lightning.pytorch.strategies", "pytorch_lightning.strategies"):
        try:
            found.append(getattr(importlib.import_module(namespace), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _deepspeed_stage(strategy: Any) -> int:
    config = getattr(strategy, "config", None) or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def shards_parameters(strategy: Any) -> bool:
    """Whether the strategy keeps only shards of the weights outside forward (FSDP, FSDP2, ZeRO-3)."""
    if isinstance(strategy, _strategy_types("FSDPStrategy") + _strategy_types("ModelParallelStrategy")):
        return True
    return isinstance(strategy, _strategy_types("DeepSpeedStrategy")) and _deepspeed_stage(strategy) >= 3


def keeps_whole_weights(strategy: Any) -> bool:
    """Whether every rank holds every weight whole at all times (single device, DDP, ZeRO-1/2).

    Only for these is the penalty added to the loss untied; any other strategy, a custom one
    included, gets the tie, which is right everywhere and costs a copy of the layer's output.
    """
    if shards_parameters(strategy):
        return False
    whole = ("SingleDeviceStrategy", "DDPStrategy", "DeepSpeedStrategy")
    return isinstance(strategy, tuple(t for name in whole for t in _strategy_types(name)))


def rank_zero_warning(message: str, category: type[Warning]) -> None:
    """Warn once in a multi-process run (global rank 0), as Lightning's own callbacks do."""
    rank_zero_warn(message, category=category)


def prepare_engine(
    engine: PenaltyEngine, trainer: Any, pl_module: torch.nn.Module, *, shard_across_ranks: bool, where: str
) -> None:
    """Set ``engine`` up on ``pl_module`` for ``trainer``'s strategy: the one set-up path of the
    callback, the mixin and the manual helper.

    Binds after the strategy has wrapped the model (names cleaned of wrappers; shapes unchecked
    on shards), ties penalties to layer outputs where weights are whole only inside forward,
    defers the NaN/inf checks on a GPU, shares pairs across ranks if asked, drops what another
    attached engine already applies identically, installs the hooks and attaches the engine.

    Raises:
        ValueError: manual optimisation on a strategy that shards weights outside forward, or a
            layer that two attached engines regularise with different settings.
    """
    strategy = trainer.strategy
    sharded = shards_parameters(strategy)
    if sharded and not pl_module.automatic_optimization:
        raise ValueError(
            f"{where}: manual optimisation with {type(strategy).__name__} is not supported (weights are sharded "
            "outside forward); use automatic optimisation"
        )
    shard = (trainer.global_rank, trainer.world_size) if shard_across_ranks and trainer.world_size > 1 else None
    engine.bind(
        pl_module,
        check_weights=not sharded,
        tie_to_output=not keeps_whole_weights(strategy),
        defer_finite_check=strategy.root_device.type == "cuda",
        shard=shard,
    )
    engine.warn = rank_zero_warning
    drop_overlap(engine, pl_module, where)
    engine.install_hooks()
    attach(pl_module, engine)


def drop_overlap(engine: PenaltyEngine, pl_module: torch.nn.Module, where: str) -> None:
    """Never apply one rule twice: a layer that another engine attached to the module (the mixin's,
    or the callback's) already regularises with the same regularizer is an error unless the rules
    are the same (coefficient, schedule, hyperparameters); then ``engine`` drops it, with a warning."""
    for other in attached_engines(pl_module):
        if other is engine:
            continue
        theirs = {(b.layer_name, b.regularizer.name): b for b in other.bindings}
        kept = []
        for b in engine.bindings:
            twin = theirs.get((b.layer_name, b.regularizer.name))
            if twin is None:
                kept.append(b)
            elif same_rule(twin.rule, b.rule):
                rank_zero_warn(
                    f"layer {b.layer_name!r} already gets {b.regularizer.name!r} from another attached set of rules; "
                    f"{where} does not apply it again"
                )
            else:
                raise ValueError(
                    f"layer {b.layer_name!r} gets {b.regularizer.name!r} both from the module's rules and from "
                    f"{where}, with different settings (coefficient, schedule or options); keep one"
                )
        engine.bindings = kept


def overrides(pl_module: torch.nn.Module, name: str) -> bool:
    """Whether the module's class overrides the ``LightningModule`` hook ``name``, in either
    namespace (``lightning.pytorch`` or ``pytorch_lightning``)."""
    base = next((c for c in type(pl_module).__mro__ if c.__name__ == "LightningModule"), None)
    if base is None:
        return hasattr(pl_module, name)
    return getattr(type(pl_module), name, None) is not getattr(base, name, None)


def rank_zero_info(trainer: Any, message: str) -> None:
    """Log ``message`` once (global rank 0) through the Lightning namespace the trainer comes from
    (``lightning.pytorch`` or ``pytorch_lightning``), whose logger the user sees."""
    namespace = "pytorch_lightning" if type(trainer).__module__.startswith("pytorch_lightning") else "lightning.pytorch"
    importlib.import_module(f"{namespace}.utilities.rank_zero").rank_zero_info(message)


def attached_engines(pl_module: torch.nn.Module) -> list[PenaltyEngine]:
    return list(getattr(pl_module, ENGINES_ATTR, []))


def attach(pl_module: torch.nn.Module, engine: PenaltyEngine) -> None:
    engines = attached_engines(pl_module)
    if engine not in engines:
        engines.append(engine)
    object.__setattr__(pl_module, ENGINES_ATTR, engines)


def detach(pl_module: torch.nn.Module, engine: PenaltyEngine) -> None:
    engines = [e for e in attached_engines(pl_module) if e is not engine]
    object.__setattr__(pl_module, ENGINES_ATTR, engines)


def add_penalty_to_output(output: Any, penalty: Tensor | None, where: str) -> Any:
    """``training_step``'s output with ``penalty`` added to its loss (Tensor or ``{"loss": ...}``)."""
    if penalty is None or output is None:
        return output
    if isinstance(output, Tensor):
        return output + penalty.to(output.dtype)
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": output["loss"] + penalty.to(output["loss"].dtype)}
    raise TypeError(
        f"{where}: training_step returned {type(output).__name__}; the hyperspherical penalty can only be added to "
        "a Tensor loss or a dict with a 'loss' tensor"
    )


def run_training_step(
    engine: PenaltyEngine, pl_module: pl.LightningModule, step_fn: Any, args: Any, kwargs: Any, where: str
) -> Any:
    """Call ``step_fn`` with the engine's hooks live and add the collected penalty to its loss."""
    trainer = pl_module._trainer
    if engine.in_step or trainer is None:
        return step_fn(*args, **kwargs)
    if not pl_module.automatic_optimization:
        calls = engine.manual_calls
        output = step_fn(*args, **kwargs)
        if engine.enabled and engine.manual_calls == calls and not engine.warned_manual:
            engine.warned_manual = True
            rank_zero_warn(
                f"{where}: the module uses manual optimisation and this training step did not take the "
                "hyperspherical penalty; add `self.hyperspherical_penalty(optimizer)` (mixin) or "
                "`lightning_hsu.hyperspherical_penalty(self, optimizer)` to the loss you pass to manual_backward",
                category=UserWarning,
            )
        return output
    engine.begin_step(trainer.global_step)
    try:
        output = step_fn(*args, **kwargs)
        return add_penalty_to_output(output, engine.collect(), where)
    finally:
        engine.end_step()


def wrap_training_step(pl_module: pl.LightningModule, engine: PenaltyEngine, where: str) -> Any:
    """Replace ``pl_module.training_step`` on the instance by a penalty-adding wrapper; returns
    the original (to restore). Lightning looks ``training_step`` up with ``getattr``, so the
    instance attribute wins, also inside the DDP/FSDP wrapper's forward."""
    original = pl_module.training_step

    @functools.wraps(original)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        return run_training_step(engine, pl_module, original, args, kwargs, where)

    object.__setattr__(pl_module, "training_step", training_step)
    return original


def manual_penalty(
    pl_module: pl.LightningModule, optimizer: Any = None, *, engines: list[PenaltyEngine] | None = None
) -> Tensor:
    """The penalty to add to a loss by hand (manual optimisation, custom loss weighting).

    In automatic optimisation it returns the tied penalties the forward pass has computed so far
    in this step (they are then not added again). In manual optimisation it computes
    \\(\\sum\\lambda R(W)\\) from the current weights, restricted to the layers whose
    parameters ``optimizer`` (a LightningOptimizer or torch optimizer) steps.
    """
    engines = attached_engines(pl_module) if engines is None else engines
    if not engines:
        raise RuntimeError(
            "no hyperspherical regularisation is attached to this module: add the HypersphericalUniformity "
            "callback to the Trainer, or declare rules with HypersphericalUniformityMixin.configure_hyperspherical"
        )
    trainer = pl_module._trainer
    step = trainer.global_step if trainer is not None else 0
    params = None
    if optimizer is not None:
        opt = getattr(optimizer, "optimizer", optimizer)
        params = [p for group in opt.param_groups for p in group["params"]]
    total: Tensor | None = None
    for engine in engines:
        if engine.in_step:
            if params is not None:
                rank_zero_warn(
                    "`optimizer` is ignored in automatic optimisation (one optimizer steps all parameters)",
                    category=UserWarning,
                )
            value = engine.collect()
        else:  # prepare_engine refused manual optimisation on sharded weights
            value = engine.direct_penalty(step, params)
            engine.manual_calls += 1
        if value is not None:
            total = value if total is None else total + value
    if total is None:
        device = next(pl_module.parameters()).device
        return torch.zeros((), device=device)
    return total


def _loggers_write_this_step(trainer: Any, step: int) -> bool:
    """Whether Lightning hands the values of global step ``step`` to the loggers: every
    ``log_every_n_steps`` steps (a ``self.log`` call costs host time, which a GPU step cannot spare
    once per layer; values logged on other steps would only refresh ``callback_metrics``)."""
    if trainer is None or trainer.fast_dev_run or trainer.should_stop:
        return True
    return (step + 1) % max(1, int(trainer.log_every_n_steps)) == 0


def penalty_log_names(bindings: Sequence[Binding], prefix: str = "hsu") -> dict[str, str]:
    """The logged name of each binding's unweighted penalty, by binding key.

    ``<prefix>/penalty/<layer>`` where one rule regularises the layer, else
    ``<prefix>/penalty/<layer>/<regularizer name>`` (rules with one regularizer on one layer share
    a name and are summed). Rule names and how the rules were written (one rule, a preset, custom
    rules) do not enter: the same layer and regularizer always give the same name.
    """
    per_layer: dict[str, set[str]] = {}
    for b in bindings:
        per_layer.setdefault(b.layer_name, set()).add(b.regularizer.name)
    names = {}
    for b in bindings:
        name = f"{prefix}/penalty/{b.layer_name}"
        names[b.key] = name if len(per_layer[b.layer_name]) == 1 else f"{name}/{b.regularizer.name}"
    return names


def rule_labels(rules: Sequence[Rule]) -> list[str]:
    """Each rule's label, with ``#<index>`` added to a label that two rules share."""
    labels = [r.label for r in rules]
    return [label + (f"#{i}" if labels.count(label) > 1 else "") for i, label in enumerate(labels)]


def coefficient_log_names(rules: Sequence[Rule], prefix: str = "hsu") -> list[str]:
    """``<prefix>/coefficient/<rule label>`` per rule (`rule_labels`)."""
    return [f"{prefix}/coefficient/{label}" for label in rule_labels(rules)]


def rule_coefficients(engine: PenaltyEngine, step: int) -> dict[str, float]:
    r"""The coefficient each rule applies at global step ``step``, \(\lambda \cdot
    \text{schedule}(t) \cdot k\) (\(k\) = ``every_n_steps``), by logged name; 0 while the
    engine is disabled. Like `LearningRateMonitor`'s learning rate: the value the user controls."""
    names = coefficient_log_names(engine.rules)
    if not engine.enabled:
        return dict.fromkeys(names, 0.0)
    k = engine.every_n_steps
    return {
        name: float(rule.coefficient * rule.effective_schedule(step) * k)
        for name, rule in zip(names, engine.rules, strict=True)
    }


def _describe(obj: object) -> str:
    """``Class(attr=value, ...)`` of a schedule (its public attributes), for a hyperparameter."""
    attrs = ", ".join(f"{k}={v!r}" for k, v in vars(obj).items() if not k.startswith("_"))
    return f"{type(obj).__name__}({attrs})"


def configuration(engine: PenaltyEngine, **settings: Any) -> dict[str, Any]:
    """The engine's rules and options as flat hyperparameters (``hsu/...``: strings and numbers)."""
    params: dict[str, Any] = {
        "hsu/every_n_steps": engine.every_n_steps,
        "hsu/on_nonfinite": engine.on_nonfinite,
        "hsu/classifier": str(engine.classifier),
        "hsu/cuda_graphs": engine.cuda_graphs,
    }
    params.update({f"hsu/{k}": v for k, v in settings.items()})
    for label, rule in zip(rule_labels(engine.rules), engine.rules, strict=True):
        base = f"hsu/rule/{label}"
        regularizer = rule.regularizer
        params[f"{base}/regularizer"] = regularizer if isinstance(regularizer, str) else type(regularizer).__name__
        params[f"{base}/coefficient"] = float(rule.coefficient)
        params[f"{base}/schedule"] = _describe(rule.schedule) if rule.schedule is not None else "constant"
        params[f"{base}/options"] = str(dict(rule.options))
        params[f"{base}/layers"] = str(rule.layers) if rule.layers is not None else "all"
        params[f"{base}/exclude"] = str(list(rule.exclude))
    return params


def log_configuration(trainer: Any, engine: PenaltyEngine, **settings: Any) -> None:
    """Send `configuration` to every logger's ``log_hyperparams``, once, on global rank 0."""
    if trainer is None or not trainer.is_global_zero:
        return
    params = configuration(engine, **settings)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


def log_values(pl_module: pl.LightningModule, engine: PenaltyEngine, *, per_layer: bool, prog_bar: bool) -> None:
    """Log the last step's penalties: ``hsu/penalty`` (weighted sum), and on the steps the loggers
    write ``hsu/penalty/<layer>[/<regularizer>]`` (unweighted, `penalty_log_names`) and
    ``hsu/coefficient/<rule>`` (`rule_coefficients`).

    Values computed from whole weights are identical on every rank and need no sync. Penalties
    shared across ranks (``shard_across_ranks``) are partial sums: they are all-reduced (on every
    rank) so that the logged value is the full penalty.
    """
    trainer = pl_module._trainer
    # the step the last penalties belong to (manual optimisation: the step `direct_penalty` used)
    step = engine.last_step if pl_module.automatic_optimization or trainer is None else trainer.global_step
    writes = _loggers_write_this_step(trainer, step)
    if per_layer and writes:  # also on steps without a penalty (a schedule at 0, a lazy step, disabled)
        for name, coefficient in rule_coefficients(engine, step).items():
            pl_module.log(name, coefficient, on_step=True, on_epoch=False, batch_size=1)
    values, weighted = engine.last_tensors()
    if not values:
        return
    if engine.shard is not None and trainer is not None:
        sharded = [b.key for b in engine.bindings if engine.is_sharded(b) and b.key in values]
        if sharded:
            stacked = torch.stack([values[k].reshape(()).float() for k in sharded])
            stacked_w = torch.stack([weighted[k].reshape(()).float() for k in sharded])
            summed = trainer.strategy.reduce(torch.stack([stacked, stacked_w]), reduce_op="sum")
            for i, key in enumerate(sharded):
                values[key], weighted[key] = summed[0, i], summed[1, i]
    total = torch.stack([w.reshape(()).float() for w in weighted.values()]).sum()
    pl_module.log("hsu/penalty", total, on_step=True, on_epoch=False, prog_bar=prog_bar, batch_size=1)
    if per_layer and writes:
        names = penalty_log_names(engine.bindings)
        per_name: dict[str, Tensor] = {}
        for key, value in values.items():
            name = names.get(key, f"hsu/penalty/{key}")
            value = value.reshape(()).float()
            per_name[name] = per_name[name] + value if name in per_name else value
        for name, value in per_name.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
