"""``HypersphericalUniformity``: the Lightning callback that adds hyperspherical penalties of
chosen layers to the training loss, with no change to the model's code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_hsu.engine import PenaltyEngine
from lightning_hsu.lightning_adapter import (
    detach,
    log_configuration,
    log_values,
    overrides,
    prepare_engine,
    rank_zero_info,
    wrap_training_step,
)
from lightning_hsu.regularizers import Regularizer
from lightning_hsu.rules import MAX_NEURONS, Rule, preset_rules
from lightning_hsu.schedules import Schedule
from lightning_hsu.validation import flag


class HypersphericalUniformity(Callback):
    r"""Add \(\sum_{layers}\lambda\,R(W_{layer})\) to the training loss.

    The penalty of each selected layer is computed from its weight every training step (where a
    strategy shards weights, inside the forward of the module that holds it whole, tied to that
    module's output) and added to the loss that ``training_step`` returns. The gradient the model
    receives is that of ``loss + Σ λ·R`` written by hand, on single device, DDP, FSDP (1 and 2),
    DeepSpeed, with AMP and gradient accumulation. Validation, test and predict pay nothing.

    Three ways to say what to regularise (combine ``preset`` and ``rules`` if you like):

    * ``HypersphericalUniformity("mhe", coefficient=1.0, options={"half_space": True})`` — one rule;
    * ``HypersphericalUniformity(preset="mhe")`` — the papers' defaults: hidden layers half-space
      with one coefficient, the classifier full space with its own (see `PRESETS`);
    * ``HypersphericalUniformity(rules=[Rule(...), Rule(...)])`` — full control.

    With nothing given, ``preset="mhe"``. At fit start the callback prints what it selected (layer,
    neurons × dim, rule, space) and every layer it left out, with the reason (frozen, depthwise,
    more than ``max_neurons`` neurons, a tied weight penalised once); `summary` returns it.

    Args:
        regularizer: name or `Regularizer` of a single rule.
        coefficient: \(\lambda\) of the single rule.
        options: constructor options of a named ``regularizer``.
        layers: glob patterns of the single rule, or of the preset's rules (default: every
            Linear/Conv/ConvTranspose, Hugging Face Conv1D and attention projection).
        exclude: glob patterns the single rule, or the preset's rules, leave out.
        rules: explicit rules.
        preset: a key of `PRESETS` (``"mhe"``, ``"mhs"``, ``"mhp"``, ...)
            or ``"mhe-transformer"`` (attention and MLP layers as separate rules).
        max_neurons: the preset's or single rule's layers with more neurons are left out unless
            named exactly in ``layers`` (``None``: no limit).
        classifier: the classifier layer for ``target="hidden"/"classifier"`` rules (a module name,
            ``"auto"`` = the last ``nn.Linear``, or ``None``).
        schedule: coefficient schedule of the single rule (per-rule schedules go in ``Rule``).
        every_n_steps: lazy regularisation: apply every k-th global step with k× the coefficient.
        on_nonfinite: ``"raise"`` (default) or ``"skip"`` when a layer's penalty is NaN/inf.
        log: log ``hsu/penalty`` (the weighted sum) every step, and the rules and options once as
            hyperparameters (``hsu/rule/<rule>/...``, every logger's ``log_hyperparams``, rank 0).
        log_per_layer: also log ``hsu/penalty/<layer>`` (unweighted values; with several
            regularizers on a layer ``hsu/penalty/<layer>/<regularizer>``) and each rule's effective
            coefficient \(\lambda \cdot \text{schedule}(t) \cdot k\) as
            ``hsu/coefficient/<rule>``, on the steps where Lightning writes to the loggers (every
            ``log_every_n_steps``): a ``self.log`` call costs host time, which a GPU step cannot
            spare once per layer. The names are listed in docs/logging.md.
        prog_bar: show ``hsu/penalty`` on the progress bar.
        enabled: start enabled (toggle at run time with `enabled`).
        shard_across_ranks: under a data-parallel strategy with W ranks, each rank computes only
            1/W of the pairs of every sum-over-pairs penalty (MHE, CoMHE), scaled by W so that
            the averaged gradient is exactly the full one; other regularizers are computed whole.
            Logged values are all-reduced to the full penalty.
        cuda_graphs: on a GPU, replay the penalties of all layers (all but MGD, MHP, MHC) as CUDA graphs captured at
            the first training step (two launches per step instead of dozens per layer; see
            `GraphedPenalties`). Used only with whole weights
            (single device, DDP, ZeRO-1/2) and ``on_nonfinite="raise"``; ``False`` computes every
            penalty eagerly.
        verbose: print the selection summary at fit start (on global rank 0).

    Examples:
        >>> from torch import nn
        >>> from lightning_hsu import HypersphericalUniformity
        >>> callback = HypersphericalUniformity(preset="mhe")  # pl.Trainer(callbacks=[callback])
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> _ = callback.engine.bind(model)  # what fit selects, and prints at its start
        >>> print(callback.summary())
        2 set(s) of neurons regularised
          0      16 x 4         mhe_hidden         half
          2      3 x 16         mhe_classifier     full
    """

    def __init__(
        self,
        regularizer: str | Regularizer | None = None,
        coefficient: float = 1.0,
        options: dict[str, Any] | None = None,
        layers: list[str] | None = None,
        exclude: list[str] | None = None,
        rules: Sequence[Rule] | None = None,
        preset: str | None = None,
        classifier: str | None = "auto",
        schedule: Schedule | None = None,
        every_n_steps: int = 1,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        log: bool = True,
        log_per_layer: bool = True,
        prog_bar: bool = False,
        enabled: bool = True,
        shard_across_ranks: bool = False,
        cuda_graphs: bool = True,
        max_neurons: int | None = MAX_NEURONS,
        verbose: bool = True,
    ) -> None:
        all_rules: list[Rule] = []
        if preset is not None:
            if regularizer is not None:
                raise ValueError(
                    "`preset` and `regularizer` both describe rules for `layers`/`exclude`; give one, "
                    "and put further rules in `rules`"
                )
            all_rules.extend(preset_rules(preset, layers=layers, exclude=exclude or (), max_neurons=max_neurons))
        if regularizer is not None:
            all_rules.append(
                Rule(
                    regularizer,
                    coefficient,
                    options=dict(options or {}),
                    layers=layers,
                    exclude=exclude if exclude is not None else [],
                    schedule=schedule,
                    max_neurons=max_neurons,
                )
            )
        elif preset is None and (options or layers or exclude or schedule is not None):
            raise ValueError(
                "`options`, `layers`, `exclude` and `schedule` describe the single rule of `regularizer` (or "
                "`layers`/`exclude` the preset's rules), neither of which is given; pass `regularizer=` or "
                "`preset=`, or put them in `rules`"
            )
        elif preset is not None and (options or schedule is not None):
            raise ValueError(
                "`options` and `schedule` describe the single rule of `regularizer`; with a preset, "
                "use `rules` for custom settings"
            )
        all_rules.extend(rules or [])
        if not all_rules:
            all_rules = preset_rules("mhe")
        self.engine = PenaltyEngine(
            all_rules,
            classifier=classifier,
            every_n_steps=every_n_steps,
            on_nonfinite=on_nonfinite,
            cuda_graphs=cuda_graphs,
        )
        self.engine.enabled = bool(enabled)
        self.shard_across_ranks = flag("HypersphericalUniformity", "shard_across_ranks", shard_across_ranks)
        self.log = log
        self.log_per_layer = log_per_layer
        self.prog_bar = prog_bar
        self.verbose = bool(verbose)
        self._original_training_step: Any = None

    @property
    @override
    def state_key(self) -> str:
        labels = ",".join(r.label for r in self.engine.rules)
        return self._generate_state_key(rules=labels)

    @property
    def enabled(self) -> bool:
        """Switch the penalty on or off at run time (e.g. from another callback)."""
        return self.engine.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.engine.enabled = bool(value)

    @property
    def rules(self) -> list[Rule]:
        return self.engine.rules

    # -- set-up -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not overrides(pl_module, "configure_model"):
            # The layers exist already: every rule/layer error is raised here, before any step.
            self.engine.bind(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks' on_fit_start runs before the module's: let a mixin bind its rules first so
        # that overlaps between the two are seen.
        prepare = getattr(pl_module, "_hsu_prepare", None)
        if prepare is not None:
            prepare()
        # after configure_model and the strategy's wrapping: bind to the modules that will run
        where = type(self).__name__
        prepare_engine(self.engine, trainer, pl_module, shard_across_ranks=self.shard_across_ranks, where=where)
        if self.verbose:
            rank_zero_info(trainer, f"{where}: {self.summary()}")
        if self.log:
            log_configuration(
                trainer, self.engine, enabled=self.engine.enabled, shard_across_ranks=self.shard_across_ranks
            )
        had_instance_attr = "training_step" in vars(pl_module)
        original = wrap_training_step(pl_module, self.engine, where)
        self._original_training_step = (had_instance_attr, original)

    def summary(self) -> str:
        """The layers regularised (neurons × dim, rule, space) and those left out, with the reason."""
        return self.engine.summary()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.engine.remove_hooks()
        detach(pl_module, self.engine)
        if self._original_training_step is not None:
            had_instance_attr, original = self._original_training_step
            if had_instance_attr:
                object.__setattr__(pl_module, "training_step", original)
            else:
                object.__delattr__(pl_module, "training_step")
            self._original_training_step = None

    # -- per step ---------------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # on a GPU the NaN/inf check waits until here, the one point before the weights change
        self.engine.check_finite_pending()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.check_finite_pending()  # a last step that never reached an optimizer step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.log:
            log_values(pl_module, self.engine, per_layer=self.log_per_layer, prog_bar=self.prog_bar)

    # -- checkpoint -------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.engine.state_dict()
        return {"regularizers": state, "enabled": self.engine.enabled} if state else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict.get("regularizers", {}))
        if "enabled" in state_dict:
            self.engine.enabled = bool(state_dict["enabled"])
