"""The engine shared by the callback and the mixin: per-layer penalties, computed where the
weights are materialised and tied to the layer's output. Pure PyTorch (no Lightning import).

Why a forward hook and a tie (see ``shared/LIGHTNING_NOTES.md``): under FSDP and DeepSpeed ZeRO-3
a layer's full weight exists only inside its forward and again in its backward. The hook computes
\\(\\lambda R(W)\\) inside the forward, and `_Tie` makes the penalty's backward wait for the
gradient of the layer's output, i.e. until the strategy has gathered the weight again. Since the
penalty is added to the loss itself, loss scaling (fp16 GradScaler), the division by
``accumulate_grad_batches`` and DDP's gradient all-reduce treat it exactly like the data loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_hsu.cuda_graphs import GraphedLayer, GraphReplay
from lightning_hsu.finite import FiniteChecks, NonFinitePenaltyError
from lightning_hsu.functional._common import NonFiniteInputError
from lightning_hsu.functional._switches import check_switches
from lightning_hsu.layers import lazy, parametrization_of
from lightning_hsu.regularizers import Capturable
from lightning_hsu.rules import Binding, Rule, Selection, find_classifier, resolve_rules
from lightning_hsu.validation import choice, flag, int_at_least

OnNonFinite = Literal["raise", "skip"]


def _to_floats(values: dict[str, Tensor]) -> dict[str, float]:
    if not values:
        return {}
    flat = torch.stack([v.reshape(()).float().cpu() for v in values.values()]).tolist()
    return dict(zip(values, flat, strict=True))


def python_warning(message: str, category: type[Warning]) -> None:
    """The engine's default way to warn (a module-level function: engines are pickled by ddp_spawn)."""
    warnings.warn(message, category, stacklevel=3)


class _Tie(torch.autograd.Function):
    """Identity on ``(output, penalty)`` whose backward needs the output's gradient.

    The output is cloned rather than returned as a view so that an in-place op after the layer
    (``ReLU(inplace=True)``) stays legal.
    """

    @staticmethod
    def forward(ctx: Any, output: Tensor, penalty: Tensor) -> tuple[Tensor, Tensor]:
        return output.clone(), penalty.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, grad_penalty: Tensor) -> tuple[Tensor, Tensor]:
        return grad_output, grad_penalty


def _first_tensor(output: Any) -> tuple[Tensor | None, Any]:
    """The first tensor of a module output, and a function that puts a replacement back."""
    if isinstance(output, Tensor):
        return output, lambda new: new
    if isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            if isinstance(item, Tensor):
                return item, lambda new, i=i: type(output)([*output[:i], new, *output[i + 1 :]])
    return None, None


@dataclass
class StepRecord:
    """What the engine computed during one training step."""

    step: int
    pending: list[Tensor] = field(default_factory=list)
    values: dict[str, Tensor] = field(default_factory=dict)
    weighted: dict[str, Tensor] = field(default_factory=dict)
    checked: int = 0
    done: set[int] = field(default_factory=set)
    #: Bindings whose hook ran with autograd off (tied mode): their penalty could not be tied.
    no_grad: set[int] = field(default_factory=set)
    #: The weights parametrizations computed in this step, by ``(id(module), attribute)``: the
    #: penalty reads the weight the forward used instead of evaluating it again.
    captured: dict[tuple[int, str], Tensor] = field(default_factory=dict)


class PenaltyEngine:
    """Per-layer hyperspherical penalties for a model, from a list of `Rule`.

    Life cycle: `bind` (resolve layers, validate), `install_hooks`, then for each
    training step `begin_step` → the model's forward (hooks note the layers that ran, or
    compute tied penalties, see `tie_to_output`) → `collect` (the sum to add to the
    loss) → `end_step`. `direct_penalty`
    computes penalties from the current weights instead (manual optimisation).

    Args:
        rules: the rules.
        classifier: the classifier layer for ``target="hidden"/"classifier"`` rules: a module
            name, ``"auto"`` (the last ``nn.Linear``) or ``None``.
        every_n_steps: apply on every k-th global step only, with the coefficient multiplied by
            k so that the expected gradient is unchanged (lazy regularisation).
        on_nonfinite: ``"raise"`` a `NonFinitePenaltyError` naming the layer and step, or
            ``"skip"`` that layer's penalty for the step (with a warning).
        cuda_graphs: on a GPU, compute the penalties of whole CUDA weights with a
            `capturable` regularizer (all but MGD, MHP, MHC) by replaying
            CUDA graphs captured at the first step (`GraphedPenalties`),
            instead of launching each layer's kernels from Python. Needs ``on_nonfinite="raise"``;
            elsewhere (CPU, FSDP/ZeRO-3 shards, parametrized weights, other regularizers) the
            penalties are computed eagerly either way.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        classifier: str | None = "auto",
        every_n_steps: int = 1,
        on_nonfinite: OnNonFinite = "raise",
        cuda_graphs: bool = True,
    ) -> None:
        if not rules:
            raise ValueError("at least one rule is needed")
        for index, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise TypeError(f"rule {index} must be a lightning_hsu.Rule, got {type(rule).__name__}")
            rule.validate(index)
        int_at_least("HypersphericalUniformity", "every_n_steps", every_n_steps, 1)
        choice("HypersphericalUniformity", "on_nonfinite", on_nonfinite, ("raise", "skip"))
        flag("HypersphericalUniformity", "cuda_graphs", cuda_graphs)
        self.rules = list(rules)
        self.classifier = classifier
        self.every_n_steps = every_n_steps
        self.on_nonfinite = on_nonfinite
        self.cuda_graphs = cuda_graphs
        self.enabled = True
        #: Compute each penalty in its layer's forward hook and tie it to the layer's output.
        #: Needed only where weights exist whole inside forward alone (FSDP, ZeRO-3). Elsewhere
        #: the hook only notes the layer, and `collect` computes the penalties from the
        #: whole weights and adds them to the loss directly (no copy of any layer's output).
        self.tie_to_output = True
        #: ``(rank, world_size)`` when sum-over-pairs penalties are shared across ranks.
        self.shard: tuple[int, int] | None = None
        self.bindings: list[Binding] = []
        #: What the last `bind` selected and left out (see `summary`).
        self.selection = Selection()
        self.classifier_name: str | None = None
        self._missed_reported = False
        #: How the engine warns: `warnings.warn` by default; the Lightning layer passes its rank-zero
        #: warning so that a multi-process run warns once.
        self.warn: Callable[[str, type[Warning]], None] = python_warning
        #: The global step of the last closed step (what `last_values` belong to).
        self.last_step = 0
        self._handles: list[Any] = []
        self._record: StepRecord | None = None
        self._pending_state: dict[str, Any] = {}
        # Penalty values of the last step per binding key, before and after the coefficient, kept
        # as detached tensors: converting each to a float would synchronise the GPU once per layer.
        self._last_values: dict[str, Tensor] = {}
        self._last_weighted: dict[str, Tensor] = {}
        #: The CUDA-graph replay of the penalties (see `GraphReplay`).
        self.graphs = GraphReplay()
        #: Check non-finite penalties in `check_finite_pending` (before the optimizer step)
        #: rather than when the loss is collected. On a GPU that check is a host sync, and in the
        #: middle of the step it lets the GPU run dry while the host waits; the adapters set it
        #: on CUDA. The weights are protected all the same: nothing has updated them yet.
        self.defer_finite_check = False
        self._finite = FiniteChecks()
        #: Calls of the manual-optimisation helper (to warn when it is never called).
        self.manual_calls = 0
        self.warned_manual = False

    # -- binding ----------------------------------------------------------------------------------
    def bind(
        self,
        root: nn.Module,
        *,
        check_weights: bool = True,
        tie_to_output: bool | None = None,
        defer_finite_check: bool | None = None,
        shard: tuple[int, int] | None = None,
    ) -> list[Binding]:
        """Resolve the rules on ``root``; regularizer state loaded earlier is applied here.

        Args:
            root: the model.
            check_weights: check the weights' shapes (impossible once a sharding strategy has
                replaced them by flat shards: then the layers bound before are kept).
            tie_to_output: compute each penalty in its layer's forward and tie it to the output
                (`tie_to_output`; ``None`` keeps the current setting).
            defer_finite_check: queue the NaN/inf checks for `check_finite_pending`
                (`defer_finite_check`; ``None`` keeps the current setting).
            shard: ``(rank, world_size)`` to share sum-over-pairs penalties across ranks.
        """
        check_switches()  # a mistyped LIGHTNING_HSU_* variable stops the run here, not at its first step
        if tie_to_output is not None:
            self.tie_to_output = tie_to_output
        if defer_finite_check is not None:
            self.defer_finite_check = defer_finite_check
        self.shard = shard
        self.classifier_name = find_classifier(root, self.classifier)
        selection = resolve_rules(root, self.rules, self.classifier_name, check_weights=check_weights)
        bindings = selection.bindings
        if self.bindings and not check_weights:
            # Shards hide the shapes: keep the layers the whole weights selected before wrapping.
            known = {b.key for b in self.bindings}
            bindings = [b for b in bindings if b.key in known]
            selection.skipped = self.selection.skipped
            selection.dropped = self.selection.dropped
        if not bindings:
            raise ValueError(
                "no layer of the model is regularised by any rule; "
                + "; ".join(f"{s.layer}: {s.reason}" for s in selection.skipped[:8])
            )
        selection.bindings = bindings
        self.selection = selection
        if self.bindings:
            # Re-binding after the strategy wrapped the model: keep each layer's regularizer state.
            old = {b.key: b.regularizer for b in self.bindings}
            for b in bindings:
                if b.key in old:
                    b.regularizer = old[b.key]
        self.bindings = bindings
        for b in bindings:
            if b.regularizer.supports_sharding:
                b.regularizer.set_shard(self.shard)
        self._apply_pending_state()
        return bindings

    def is_sharded(self, binding: Binding) -> bool:
        """Whether this binding computes only this rank's share of its pairs."""
        return self.shard is not None and binding.regularizer.supports_sharding

    def coefficient(self, binding: Binding, step: int) -> float:
        """\\(\\lambda \\cdot \\text{schedule}(step) \\cdot k\\) on an active step, else 0."""
        if not self.enabled or step % self.every_n_steps != 0:
            return 0.0
        return binding.rule.coefficient * binding.rule.effective_schedule(step) * self.every_n_steps

    # -- hooks ------------------------------------------------------------------------------------
    def install_hooks(self) -> None:
        """Register the forward hooks (idempotent).

        With `tie_to_output`, one hook per module whose forward runs with the weights whole
        computes their penalties there. Parametrized weights get a hook on their parametrization
        that keeps the weight the forward computed, so it is evaluated once per step. Hooks are
        prepended: after FSDP2's ``fully_shard`` its post-forward hook reshards the weight, so
        ours must run first.
        """
        self.remove_hooks()
        captured: set[tuple[int, str]] = set()
        for b in self.bindings:
            view = b.view
            key = (id(view.module), view.attribute)
            if view.parametrized and key not in captured:
                captured.add(key)
                plist = parametrization_of(view.module, view.attribute)
                self._handles.append(plist.register_forward_hook(self._make_capture_hook(key)))
        if not self.tie_to_output:
            return
        modules: dict[int, tuple[nn.Module, list[Binding]]] = {}
        for b in self.bindings:
            hook_module = b.view.hook_module
            assert hook_module is not None
            modules.setdefault(id(hook_module), (hook_module, []))[1].append(b)
        for module, bindings in modules.values():
            hook = self._make_hook(bindings)
            self._handles.append(module.register_forward_hook(hook, prepend=True))

    def remove_hooks(self) -> None:
        """Remove the hooks and free any captured CUDA graphs (and their memory)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.graphs.clear()

    def _make_capture_hook(self, key: tuple[int, str]) -> Any:
        engine = self

        @torch.compiler.disable
        def capture(parametrization: nn.Module, args: Any, output: Any) -> None:
            record = engine._record
            if record is not None and torch.is_grad_enabled() and isinstance(output, Tensor):
                record.captured.setdefault(key, output)

        return capture

    def _make_hook(self, bindings: list[Binding]) -> Any:
        engine = self

        @torch.compiler.disable
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            record = engine._record
            if record is None:
                return None
            if not torch.is_grad_enabled():
                record.no_grad.update(id(b) for b in bindings)
                return None
            todo = [b for b in bindings if id(b) not in record.done]
            if not todo:
                return None  # weight sharing: once per step
            record.done.update(id(b) for b in todo)
            total = None
            for b in todo:
                value = engine._penalty_of(b, record.step)
                if value is None:
                    continue
                total = value if total is None else total + value
            if total is None:
                return None
            target, put_back = _first_tensor(output)
            if target is None:
                raise TypeError(
                    f"layer {bindings[0].layer_name!r} returned {type(output).__name__}, which holds no tensor "
                    "to tie the penalty to"
                )
            tied_output, tied_total = _Tie.apply(target, total)
            record.pending.append(tied_total)
            return put_back(tied_output)

        return hook

    def _neurons(self, binding: Binding) -> Tensor:
        """The binding's neurons as the layer used them in this step."""
        view = binding.view
        record = self._record
        if view.parametrized and record is not None:
            weight = record.captured.get((id(view.module), view.attribute))
            if weight is not None:
                return view.neurons_from(weight)
        neurons = view.neurons()
        if neurons.shape[0] < 2:  # a lazy layer, materialised after the checks of `bind`
            raise ValueError(f"layer {binding.layer_name!r} has {neurons.shape[0]} neuron; at least 2 are needed")
        return neurons

    def _penalty_of(self, binding: Binding, step: int) -> Tensor | None:
        coefficient = self.coefficient(binding, step)
        if coefficient == 0.0 or not binding.view.trainable():  # frozen for now (fine-tuning schedules)
            return None
        try:
            neurons = self._neurons(binding)
            if self._checked_per_step(binding, neurons):
                penalty = binding.regularizer(neurons, step=step, check_finite=False)
            else:
                penalty = binding.regularizer(neurons, step=step)
        except NonFiniteInputError as err:
            message = (
                f"the weights of layer {binding.layer_name!r} contain NaN or inf at global step {step}, so its "
                f"{binding.rule.label!r} penalty is undefined"
            )
            if self.on_nonfinite == "raise":
                raise NonFinitePenaltyError(message + " (set on_nonfinite='skip' to skip such steps)") from err
            self.warn(message + "; skipped (on_nonfinite='skip')", RuntimeWarning)
            return None
        value = penalty.detach()
        if self.on_nonfinite == "skip" and not bool(torch.isfinite(value)):
            self.warn(self._nonfinite_message(binding, value, step) + "; skipped (on_nonfinite='skip')", RuntimeWarning)
            return None
        assert self._record is not None
        self._record.values[binding.key] = value
        self._record.weighted[binding.key] = coefficient * value
        if self.is_sharded(binding):
            # Strategies average gradients over ranks; the shares sum to the full gradient, so
            # each is scaled by the world size (values are recorded unscaled: they sum to R).
            assert self.shard is not None
            return coefficient * self.shard[1] * penalty
        return coefficient * penalty

    def _checked_per_step(self, binding: Binding, neurons: Tensor) -> bool:
        """Whether this penalty leaves its NaN/inf check to the step's one check of all values.

        On a GPU each layer's own check is a host sync, which stalls the queue of kernels; a
        capturable regularizer then gives NaN for non-finite weights, and `_check_finite`
        raises for it, naming the layer, before the backward pass.
        """
        return self.on_nonfinite == "raise" and binding.regularizer.capturable and neurons.is_cuda

    @staticmethod
    def _nonfinite_message(binding: Binding, value: Tensor, step: int) -> str:
        weight = binding.view.source()
        if not bool(torch.isfinite(weight.detach()).all()):
            return (
                f"the weights of layer {binding.layer_name!r} contain NaN or inf at global step {step}, so its "
                f"{binding.rule.label!r} penalty is undefined; the weights were not updated with it"
            )
        return (
            f"the {binding.rule.label!r} penalty of layer {binding.layer_name!r} is {float(value)} at global step "
            f"{step}; the weights were not updated with it"
        )

    # -- CUDA graphs ------------------------------------------------------------------------------
    def _replay_graphs(self, record: StepRecord, todo: list[Binding]) -> list[Binding]:
        """Compute the penalties of ``todo`` that a CUDA graph can hold by replaying it
        (`GraphReplay`); return the bindings left to compute eagerly."""
        if not self.cuda_graphs or self.on_nonfinite != "raise" or not self.graphs.available():
            return todo
        graphed: list[GraphedLayer] = []
        by_token: dict[int, Binding] = {}
        rest: list[Binding] = []
        for binding in todo:
            coefficient = self.coefficient(binding, record.step)
            view = binding.view
            plain = not view.parametrized and view.layout != "lora_update"
            regularizer = binding.regularizer
            if (
                coefficient == 0.0
                or not plain
                or not isinstance(regularizer, Capturable)
                or not self.graphs.eligible(regularizer, view.source())
            ):
                rest.append(binding)
                continue
            scale = float(self.shard[1]) if self.shard is not None and self.is_sharded(binding) else 1.0
            graphed.append(GraphedLayer(id(binding), view.source(), view.neurons_from, regularizer, coefficient, scale))
            by_token[id(binding)] = binding
        if not graphed:
            return todo
        try:
            replayed = self.graphs(graphed, record.step)
        except RuntimeError as err:
            self.cuda_graphs = False
            self.warn(
                f"capturing the hyperspherical penalties in a CUDA graph failed ({err}); they are computed "
                "eagerly from now on (pass cuda_graphs=False to skip the attempt)",
                RuntimeWarning,
            )
            return todo
        for i, layer in enumerate(replayed.layers):
            key = by_token[layer.token].key
            record.values[key] = replayed.values[i]
            record.weighted[key] = replayed.weighted[i]
        record.pending.append(replayed.loss)
        return rest

    @property
    def graph_captures(self) -> int:
        """CUDA-graph captures made so far."""
        return self.graphs.captures

    # -- NaN / inf --------------------------------------------------------------------------------
    def _check_finite(self, record: StepRecord) -> None:
        """Raise `NonFinitePenaltyError` naming the first non-finite layer penalty.

        One check (one device synchronisation) for all the penalties computed since the last one,
        before any of them reaches a backward pass; with `defer_finite_check` they are
        queued for `check_finite_pending` instead.
        """
        keys = list(record.values)[record.checked :]
        record.checked += len(keys)
        if not keys or self.on_nonfinite != "raise":
            return
        entries = [(record.step, key, record.values[key]) for key in keys]
        if self.defer_finite_check:
            self._finite.defer(entries)
        else:
            self._raise_for(self._finite.first_nonfinite(entries))

    def check_finite_pending(self) -> None:
        """Finish the checks queued by `defer_finite_check`.

        Call it before the optimizer steps (the callback and the mixin do, in
        ``on_before_optimizer_step``): a non-finite penalty raises
        `NonFinitePenaltyError` naming its layer and step before any weight is updated.
        On a GPU it waits until the answers of the step's penalties have reached the host, which
        they do once the penalties' forward has run (an event, not a synchronisation of the
        whole queue).
        """
        self._raise_for(self._finite.finish())

    def _raise_for(self, entry: tuple[int, str, Tensor] | None) -> None:
        if entry is None:
            return
        step, bad, value = entry
        binding = next(b for b in self.bindings if b.key == bad)
        raise NonFinitePenaltyError(
            self._nonfinite_message(binding, value, step) + " (set on_nonfinite='skip' to skip such steps)"
        )

    # -- steps ------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Start a training step: hooks note (or compute) penalties until `end_step`."""
        oldest = self._finite.oldest_step
        if oldest is not None and oldest < step:
            # queued by an earlier global step and never checked (an `on_before_optimizer_step`
            # override that does not call super): check them now, long computed, before more pile up
            self.check_finite_pending()
        self._record = StepRecord(step)

    @property
    def in_step(self) -> bool:
        return self._record is not None

    def collect(self) -> Tensor | None:
        """Sum of the penalties of the layers that ran so far in this step (``None`` if none).

        Untied penalties are computed here, from the layers noted by the hooks (each ran with
        autograd on, hence `torch.enable_grad`). Each penalty is returned once: a second
        call returns only what was computed since.
        """
        record = self._record
        if record is None:
            return None
        # Whole weights: every selected layer, whether or not its forward ran with autograd on
        # (reentrant checkpointing) or at all (weights read outside forward).
        todo = [] if self.tie_to_output else [b for b in self.bindings if id(b) not in record.done]
        record.done.update(id(b) for b in todo)
        with torch.enable_grad():
            for binding in self._replay_graphs(record, todo):
                value = self._penalty_of(binding, record.step)
                if value is not None:
                    record.pending.append(value)
        self._check_finite(record)
        total: Tensor | None = None
        for tied in record.pending:
            total = tied if total is None else total + tied
        record.pending = []
        return total

    @staticmethod
    def _owns(module: nn.Module, wanted: set[int]) -> bool:
        return any(id(p) in wanted for p in module.parameters())

    def end_step(self) -> None:
        """Close the step; its values become `last_values`."""
        record, self._record = self._record, None
        if record is not None:
            self.last_step = record.step
            self._last_values = dict(record.values)
            self._last_weighted = dict(record.weighted)
            if self.tie_to_output and not self._missed_reported:
                self._missed_reported = True
                self._report_missed(record)

    def _report_missed(self, record: StepRecord) -> None:
        """Warn once, after the first step, about tied layers whose penalty never reached the loss."""
        missed = []
        for b in self.bindings:
            if id(b) in record.done or not b.view.trainable():
                continue
            if id(b) in record.no_grad:
                why = "its forward ran with autograd off (reentrant activation checkpointing? use use_reentrant=False)"
            else:
                why = "its forward was not called in this step"
            missed.append(f"{b.layer_name}: {why}")
        if missed:
            self.warn(
                "hyperspherical penalties of these layers did not reach the loss in the first training step, because "
                "under a sharded strategy a penalty is computed in its layer's forward: " + "; ".join(missed),
                RuntimeWarning,
            )

    def summary(self) -> str:
        """What is regularised: a line per set of neurons (layer, neurons × dim, rule, space) and
        one per layer left out, with the reason."""
        rows = []
        for b in self.bindings:
            shape = b.view.shape() if not lazy(b.view) else None
            size = f"{shape[0]} x {shape[1]}" if shape is not None else "lazy (bound when materialised)"
            space = "half" if b.regularizer.hparams().get("half_space") else "full"
            if b.view.parametrized:
                space += ", the parametrized (effective) weight"
            elif b.view.layout == "lora_update":
                space += ", the LoRA update"
            rows.append((b.layer_name, size, b.rule.label, space))
        width = max([len(r[0]) for r in rows] + [5])
        lines = [
            f"{len(rows)} set(s) of neurons regularised"
            + (f", {len(self.selection.skipped)} left out" if self.selection.skipped else "")
        ]
        lines += [f"  {name:<{width}}  {size:<14} {label:<18} {space}" for name, size, label, space in rows]
        for s in self.selection.skipped:
            lines.append(f"  left out: {s.layer} (rule {s.rule_index}): {s.reason}")
        for _, reason in self.selection.dropped:
            lines.append(f"  {reason}")
        return "\n".join(lines)

    @property
    def last_values(self) -> dict[str, float]:
        """Penalty of each binding (``<layer>/<rule>``) in the last step, before its coefficient."""
        return _to_floats(self._last_values)

    @property
    def last_weighted(self) -> dict[str, float]:
        r"""\(\lambda_{eff} R\) of each binding in the last step (what the loss received)."""
        return _to_floats(self._last_weighted)

    def last_tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The last step's values, before and after the coefficients, as detached tensors (read
        without a device synchronisation)."""
        return dict(self._last_values), dict(self._last_weighted)

    def direct_penalty(self, step: int, params: Iterable[Tensor] | None = None) -> Tensor | None:
        """\\(\\sum \\lambda R(W)\\) from the layers' current weights (no hooks, no tie).

        For manual optimisation on strategies that keep whole weights on every rank (single
        device, DDP). ``params`` restricts the sum to layers owning one of them (e.g. the
        parameters of the optimizer about to step).
        """
        wanted = None if params is None else {id(p) for p in params}
        total: Tensor | None = None
        own_record = self._record is None
        if own_record:
            self._record = StepRecord(step)
        assert self._record is not None
        try:
            for b in self.bindings:
                if wanted is not None and not self._owns(b.module, wanted):
                    continue
                value = self._penalty_of(b, step)
                if value is not None:
                    total = value if total is None else total + value
            self._check_finite(self._record)
            values, weighted = dict(self._record.values), dict(self._record.weighted)
        finally:
            if own_record:
                self._record = None
        self._last_values.update(values)
        self._last_weighted.update(weighted)
        return total

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Regularizer state per binding key (poles, projection counters); tensors and primitives."""
        state = {b.key: b.regularizer.state_dict() for b in self.bindings if b.regularizer.stateful}
        state = {k: v for k, v in state.items() if v}
        # State loaded but not yet bound (resume before the model is built) is kept, not lost.
        for key, value in self._pending_state.items():
            state.setdefault(key, value)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_state = dict(state)
        if self.bindings:
            self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        if not self._pending_state:
            return
        keys = {b.key: b for b in self.bindings}
        unknown = sorted(set(self._pending_state) - set(keys))
        if unknown:
            self.warn(
                f"hyperspherical regularizer state for {unknown} does not match any regularised layer of this "
                "model; it is ignored",
                UserWarning,
            )
        for key, value in self._pending_state.items():
            if key in keys:
                keys[key].regularizer.load_state_dict(value)
        self._pending_state = {}
