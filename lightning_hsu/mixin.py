"""``HypersphericalUniformityMixin``: hyperspherical penalties declared inside a LightningModule.

For users who want the penalty in their own ``training_step`` (manual optimisation, GANs,
custom loss weighting). It shares `PenaltyEngine` with the callback.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import lightning.pytorch as pl
from torch import Tensor

from lightning_hsu.engine import OnNonFinite, PenaltyEngine
from lightning_hsu.lightning_adapter import (
    attach,
    log_configuration,
    log_values,
    manual_penalty,
    prepare_engine,
    run_training_step,
)
from lightning_hsu.rules import Rule, preset_rules
from lightning_hsu.validation import flag

_ENGINE_ATTR = "_hsu_mixin_engine"
_SETTINGS_ATTR = "_hsu_mixin_settings"


@dataclass(frozen=True)
class _Settings:
    """The mixin's options that are not the engine's."""

    shard_across_ranks: bool
    log: bool
    log_per_layer: bool
    prog_bar: bool


def _as_rule(rule: Rule | dict[str, Any], index: int) -> Rule:
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, dict):
        try:
            return Rule(**rule)
        except TypeError as err:
            raise ValueError(f"rule {index}: {err}") from None
    raise TypeError(f"rule {index} must be a Rule or a dict of Rule fields, got {type(rule).__name__}")


class HypersphericalUniformityMixin:
    """Mix into a LightningModule (any order of the bases; an inherited ``training_step`` works)::

        class Net(HypersphericalUniformityMixin, pl.LightningModule):
            def __init__(self, hsu_rules=({"regularizer": "mhe", "coefficient": 1.0},)):
                super().__init__()
                self.save_hyperparameters()
                ...
                self.configure_hyperspherical(rules=hsu_rules)

            def training_step(self, batch, batch_idx):
                loss = ...
                return loss + self.hyperspherical_penalty()   # or leave it out: added for you

    Rules given as plain dicts keep ``save_hyperparameters`` checkpoints loadable with
    ``weights_only=True``. In automatic optimisation, penalties not taken with
    `hyperspherical_penalty` are added to the returned loss; in manual optimisation call
    `hyperspherical_penalty` (optionally per optimizer) and add it to what you backpropagate.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Wrap the methods the class resolves, wherever they are defined (the class itself, a base
        # further down, or LightningModule), so the mixin works in any order of the bases.
        for name, wrap in _WRAPPERS.items():
            method = getattr(cls, name, None)
            if method is not None and not getattr(method, "_hsu_wrapped", False):
                wrapped = wrap(method)
                wrapped._hsu_wrapped = True
                setattr(cls, name, wrapped)

    def configure_hyperspherical(
        self,
        rules: Sequence[Rule | dict[str, Any]] | None = None,
        *,
        preset: str | None = None,
        classifier: str | None = "auto",
        every_n_steps: int = 1,
        on_nonfinite: OnNonFinite = "raise",
        cuda_graphs: bool = True,
        shard_across_ranks: bool = False,
        log: bool = True,
        log_per_layer: bool = True,
        prog_bar: bool = False,
    ) -> None:
        """Declare the module's rules (validated now; layers are bound when training starts).

        The options are those of `HypersphericalUniformity`, but
        for the callback's single-rule shortcuts (`regularizer`, `coefficient`, `options`,
        `layers`, `exclude`, `schedule`, `max_neurons`: put them in a rule) and `verbose` (the
        mixin's selection is in `self.hyperspherical_engine.summary()`).
        """
        all_rules = preset_rules(preset) if preset is not None else []
        all_rules += [_as_rule(r, i) for i, r in enumerate(rules or [])]
        engine = PenaltyEngine(
            all_rules,
            classifier=classifier,
            every_n_steps=every_n_steps,
            on_nonfinite=on_nonfinite,
            cuda_graphs=cuda_graphs,
        )
        settings = _Settings(
            flag("HypersphericalUniformityMixin", "shard_across_ranks", shard_across_ranks),
            flag("HypersphericalUniformityMixin", "log", log),
            flag("HypersphericalUniformityMixin", "log_per_layer", log_per_layer),
            flag("HypersphericalUniformityMixin", "prog_bar", prog_bar),
        )
        object.__setattr__(self, _ENGINE_ATTR, engine)
        object.__setattr__(self, _SETTINGS_ATTR, settings)
        object.__setattr__(self, "_hsu_ready", False)

    @property
    def hyperspherical_engine(self) -> PenaltyEngine | None:
        return _engine_of(self)

    def _hsu_prepare(self) -> None:
        engine = _engine_of(self)
        if engine is None or getattr(self, "_hsu_ready", False):
            return
        trainer = getattr(self, "_trainer", None)
        if trainer is None:  # used outside a Trainer: the tie is right everywhere
            engine.bind(self, tie_to_output=True)  # type: ignore[arg-type]
            engine.install_hooks()
            attach(self, engine)  # type: ignore[arg-type]
        else:
            settings: _Settings = getattr(self, _SETTINGS_ATTR)
            module = cast("pl.LightningModule", self)
            prepare_engine(
                engine, trainer, module, shard_across_ranks=settings.shard_across_ranks, where=type(self).__name__
            )
            if settings.log:
                log_configuration(trainer, engine, shard_across_ranks=settings.shard_across_ranks)
        object.__setattr__(self, "_hsu_ready", True)

    def hyperspherical_penalty(self, optimizer: Any = None) -> Tensor:
        """The penalty to add to the loss; see `lightning_hsu.hyperspherical_penalty`."""
        engine: PenaltyEngine | None = getattr(self, _ENGINE_ATTR, None)
        if engine is None:
            raise RuntimeError(
                f"{type(self).__name__}.hyperspherical_penalty(): call self.configure_hyperspherical(...) first"
            )
        self._hsu_prepare()
        return manual_penalty(self, optimizer, engines=[engine])  # type: ignore[arg-type]


def _engine_of(module: Any) -> PenaltyEngine | None:
    return getattr(module, _ENGINE_ATTR, None)


def _wrap_training_step(step: Any) -> Any:
    @functools.wraps(step)
    def training_step(self: Any, *args: Any, **kw: Any) -> Any:
        engine = _engine_of(self)
        if engine is None:
            return step(self, *args, **kw)
        self._hsu_prepare()
        # Re-entry (a subclass calling super().training_step) is a no-op in run_training_step.
        return run_training_step(engine, self, functools.partial(step, self), args, kw, type(self).__name__)

    return training_step


def _wrap_on_fit_start(hook: Any) -> Any:
    @functools.wraps(hook)
    def on_fit_start(self: Any) -> Any:
        self._hsu_prepare()  # hooks go in before the sanity check, so a compiled forward sees them
        return hook(self)

    return on_fit_start


def _wrap_check_pending(hook: Any) -> Any:
    """On a GPU the NaN/inf check of the penalties waits until the optimizer step or the end."""

    @functools.wraps(hook)
    def checked(self: Any, *args: Any, **kw: Any) -> Any:
        engine = _engine_of(self)
        if engine is not None:
            engine.check_finite_pending()
        return hook(self, *args, **kw)

    return checked


def _wrap_on_train_batch_end(hook: Any) -> Any:
    @functools.wraps(hook)
    def on_train_batch_end(self: Any, *args: Any, **kw: Any) -> Any:
        engine = _engine_of(self)
        settings: _Settings | None = getattr(self, _SETTINGS_ATTR, None)
        if engine is not None and settings is not None and settings.log:
            log_values(self, engine, per_layer=settings.log_per_layer, prog_bar=settings.prog_bar)
        return hook(self, *args, **kw)

    return on_train_batch_end


_WRAPPERS = {
    "training_step": _wrap_training_step,
    "on_fit_start": _wrap_on_fit_start,
    "on_before_optimizer_step": _wrap_check_pending,
    "on_train_end": _wrap_check_pending,
    "on_train_batch_end": _wrap_on_train_batch_end,
}


def hyperspherical_penalty(pl_module: pl.LightningModule, optimizer: Any = None) -> Tensor:
    """The penalty of every engine attached to ``pl_module`` (callback and/or mixin).

    Automatic optimisation: the penalties computed so far in this step (not added again later).
    Manual optimisation: \\(\\sum\\lambda R(W)\\) of the current weights of the layers that
    ``optimizer`` steps (all layers if ``None``). Add it to the loss you backpropagate.
    """
    prepare = getattr(pl_module, "_hsu_prepare", None)
    if prepare is not None:
        prepare()
    return manual_penalty(pl_module, optimizer)
