"""Rules: which layers get which regularizer, with what coefficient and schedule.

A `Rule` selects layers of a model (by type, glob or regex on the qualified module name,
explicit names, exclusions, and the hidden/classifier split of the papers) and says how to
regularise them. `resolve_rules` turns rules and a model into per-layer bindings, with
errors that name the rule, the option or the layer at fault. Pure PyTorch.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from lightning_hsu.layers import (
    DEFAULT_LAYER_TYPES,
    SUPPORTED_KINDS,
    LayerView,
    ancestors,
    is_candidate_type,
    is_depthwise,
    is_hf_conv1d,
    layer_views,
    lazy,
    user_modules,
    within_lora_layer,
)
from lightning_hsu.regularizers import MGD, MHE, MHP, MHS, RMHP, CoMHE, Regularizer, make_regularizer
from lightning_hsu.regularizers.registry import REGULARIZERS
from lightning_hsu.schedules import Constant, Schedule
from lightning_hsu.validation import choice, flag, int_at_least, positive_float

Target = Literal["all", "hidden", "classifier", "attention", "mlp", "embedding"]
_TARGETS = ("all", "hidden", "classifier", "attention", "mlp", "embedding")
#: Layers with more neurons than this are left out unless a rule names them (`Rule.max_neurons`).
MAX_NEURONS = 8192


@dataclass
class Rule:
    """One regularisation rule.

    Args:
        regularizer: a name from `REGULARIZERS` (``"mhe"``,
            ``"mhs"``, ``"mhp"``, ``"mhc"``, ``"mgd"``, ``"rmhp"``, ``"comhe"``, ``"uniformity"``)
            or a `Regularizer` instance.
        coefficient: \\(\\lambda\\) (finite, >= 0).
        options: constructor options when ``regularizer`` is a name, e.g. ``{"half_space": True}``.
        layers: exact module names, or glob patterns (``fnmatch``) that select the matching modules
            having a 2+-D ``weight``; ``None`` = all modules of ``layer_types``. Every pattern must
            match at least one module.
        regex: a regular expression the qualified module name must match (``re.search``).
        layer_types: module class names (any class in the module's MRO counts); ``None`` =
            `DEFAULT_LAYER_TYPES` of `lightning_hsu.layers` (Linear, Conv*, ConvTranspose*,
            Hugging Face Conv1D, MultiheadAttention).
        exclude: glob patterns of modules to leave out.
        target: ``"all"``, ``"hidden"`` (everything but the classifier), ``"classifier"``, or a
            role of a transformer's layers: ``"attention"`` (Q/K/V/output projections),
            ``"mlp"`` (the other linear layers), ``"embedding"`` (``nn.Embedding``); the roles
            leave the classifier out.
        schedule: coefficient schedule over global steps (default constant).
        name: label used in logged keys (default: the regularizer's name).
        per_head: split every attention projection into its heads, each head's rows a layer.
        lora: ``"skip"`` (default) leaves PEFT LoRA layers' adapter factors alone (their frozen
            base weights are skipped as frozen); ``"update"`` regularises the rows of each LoRA
            layer's update ``scaling · B A``.
        max_neurons: layers with more neurons are left out unless named exactly in ``layers``
            (a tied LM head or a huge embedding would cost many steps' time; regularise those by
            name, e.g. with a sampled regularizer); ``None`` = no limit.
        required: raise when the rule selects no layer (``False``: the rule is dropped, and the
            selection summary says so; the presets' classifier rule).

    Examples:
        >>> from lightning_hsu import Rule, LinearWarmup
        >>> rule = Rule("mhe", 1.0, options={"half_space": True}, target="hidden", schedule=LinearWarmup(500))
        >>> rule.label, rule.build_regularizer()
        ('mhe', MHE(power=2.0, distance='euclidean', half_space=True, eps=0.0001, chunk_size=None, precision='float32'))
    """

    regularizer: str | Regularizer = "mhe"
    coefficient: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    layers: list[str] | None = None
    regex: str | None = None
    layer_types: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    target: Target = "all"
    schedule: Schedule | None = None
    name: str | None = None
    per_head: bool = False
    lora: Literal["skip", "update"] = "skip"
    max_neurons: int | None = MAX_NEURONS
    required: bool = True

    def validate(self, index: int) -> None:
        """Check the options that do not depend on a model; errors name the rule and option."""
        where = f"rule {index} ({self.label})"
        positive_float(where, "coefficient", self.coefficient, allow_zero=True)
        choice(where, "target", self.target, _TARGETS)
        choice(where, "lora", self.lora, ("skip", "update"))
        flag(where, "per_head", self.per_head)
        flag(where, "required", self.required)
        if self.max_neurons is not None:
            int_at_least(where, "max_neurons", self.max_neurons, 2)
        if self.layers is not None and (
            isinstance(self.layers, str) or not all(isinstance(p, str) for p in self.layers)
        ):
            raise ValueError(f"{where}: `layers` must be a list of name patterns, got {self.layers!r}")
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"{where}: `exclude` must be a list of name patterns, got {self.exclude!r}")
        if self.layer_types is not None and (
            isinstance(self.layer_types, str) or not all(isinstance(t, str) for t in self.layer_types)
        ):
            raise ValueError(f"{where}: `layer_types` must be a list of class names, got {self.layer_types!r}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as err:
                raise ValueError(f"{where}: `regex` {self.regex!r} is not a valid regular expression: {err}") from None
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ValueError(f"{where}: `schedule` must be a lightning_hsu.schedules.Schedule, got {self.schedule!r}")
        if isinstance(self.regularizer, str) and self.regularizer.lower() == "rmhp" and "half_space" in self.options:
            raise ValueError(
                f"{where}: R-MHP has no half-space form, drop option `half_space` (a neuron and its negation cancel)"
            )
        try:
            self.build_regularizer()
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.regularizer, Regularizer):
            return self.regularizer.name
        return str(self.regularizer).lower()

    def build_regularizer(self) -> Regularizer:
        """The template regularizer of this rule (spawned per layer by the engine)."""
        return make_regularizer(self.regularizer, **self.options)

    @property
    def effective_schedule(self) -> Schedule:
        return self.schedule if self.schedule is not None else Constant()


@dataclass
class Binding:
    """One (set of neurons, rule) pair: the layer's own regularizer instance and coefficient."""

    view: LayerView
    rule_index: int
    rule: Rule
    regularizer: Regularizer

    @property
    def layer_name(self) -> str:
        return self.view.name

    @property
    def module(self) -> nn.Module:
        return self.view.module

    @property
    def key(self) -> str:
        """Unique key, used for logging and for state: ``<layer>/<rule label>``."""
        return f"{self.layer_name}/{self.rule.label}"


@dataclass
class Skipped:
    """A layer a rule matched but does not regularise, and why (shown in the selection summary)."""

    layer: str
    rule_index: int
    reason: str


@dataclass
class Selection:
    """What `resolve_rules` made of the rules: the bindings, the layers left out and why,
    and the optional rules that selected nothing."""

    bindings: list[Binding] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)


def find_classifier(root: nn.Module, classifier: str | None) -> str | None:
    """Name of the classifier: ``classifier`` if given, else the last linear layer registered
    (``nn.Linear`` or Hugging Face ``Conv1D``) outside attention and outside a stack of blocks
    (an ``nn.ModuleList``: a transformer's layers); ``None`` if there is none."""
    modules = dict(user_modules(root))
    if classifier is None:
        return None
    if classifier != "auto":
        if classifier not in modules:
            raise ValueError(f"classifier layer {classifier!r} is not a module of the model; modules: {_some(modules)}")
        return classifier
    linear = [
        name
        for name, m in modules.items()
        if (isinstance(m, nn.Linear) or is_hf_conv1d(m))
        and not within_lora_layer(name, modules)
        and not _in_block_stack(name, modules)
        and all(v.role != "attention" for v in layer_views(name, m, modules))
    ]
    return linear[-1] if linear else None


def _in_block_stack(name: str, modules: dict[str, nn.Module]) -> bool:
    return any(isinstance(a, nn.ModuleList) for a in ancestors(name, modules))


def _some(modules: dict[str, nn.Module], limit: int = 12) -> str:
    names = list(modules)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _in_target(view: LayerView, rule: Rule, classifier: str | None) -> bool:
    is_classifier = view.module_name == classifier
    if rule.target == "all":
        return True
    if rule.target == "classifier":
        return is_classifier
    if rule.target == "hidden":
        return not is_classifier
    return not is_classifier and view.role == rule.target


def _skip_reason(view: LayerView, rule: Rule, exact: bool, modules: dict[str, nn.Module], check: bool) -> str | None:
    """Why a matched view is left out (``None``: kept); raises for a layer named exactly that
    cannot be regularised."""
    if within_lora_layer(view.module_name, modules):
        return "inside a LoRA layer (Rule(lora='update') regularises the layer's update)"
    if not exact and is_depthwise(view.module):
        return "depthwise convolution: each filter reads its own input channel (name it in `layers` to include it)"
    if not view.trainable():
        return "frozen (requires_grad=False)"
    if not check or lazy(view):
        return None
    full = view.source_shape()
    if full is None or len(full) < 2:
        if exact:
            raise ValueError(
                f"layer {view.name!r} ({type(view.module).__name__}) has a weight of shape {full}; "
                "hyperspherical penalties need one neuron per row (2+ dimensions)"
            )
        return "no neuron matrix (a 1-D weight)"
    shape = view.shape()
    assert shape is not None
    if shape[0] < 2:
        if exact:
            raise ValueError(f"layer {view.name!r} has {shape[0]} neuron; at least 2 are needed")
        return f"{shape[0]} neuron (at least 2 are needed)"
    if not exact and rule.max_neurons is not None and shape[0] > rule.max_neurons:
        return (
            f"{shape[0]} neurons > max_neurons={rule.max_neurons} (name it in `layers`, or raise `max_neurons`, "
            "to regularise it)"
        )
    return None


def select_layers(
    root: nn.Module,
    rule: Rule,
    index: int,
    classifier: str | None,
    *,
    check_weights: bool = True,
    skipped: list[Skipped] | None = None,
) -> list[LayerView]:
    """The sets of neurons ``rule`` applies to, in registration order; errors name the rule and
    pattern. Matched layers left out (frozen, depthwise, too large, ...) are appended to
    ``skipped`` with the reason.

    ``check_weights=False`` skips the checks of weight shape, which cannot be made once a
    sharding strategy has replaced the weights by flat shards.
    """
    where = f"rule {index} ({rule.label})"
    modules = dict(user_modules(root))
    if rule.layer_types is not None:
        types: tuple[str, ...] = tuple(rule.layer_types)
    else:
        types = ("Embedding",) if rule.target == "embedding" else DEFAULT_LAYER_TYPES
    patterns = rule.layers
    chosen: list[LayerView] = []
    notes: list[Skipped] = []
    hit: set[str] = set()
    for name, module in modules.items():
        if patterns is not None:
            module_hit = _matches(name, patterns)
            views = layer_views(name, module, modules, per_head=rule.per_head, lora=rule.lora)
            if name in patterns and not views:
                raise ValueError(
                    f"{where}: layer {name!r} ({type(module).__name__}) has no tensor `weight` to regularise; "
                    f"supported kinds: {SUPPORTED_KINDS}"
                )
            views = [v for v in views if module_hit or _matches(v.name, patterns)]
            if module_hit:
                hit.update(p for p in patterns if fnmatch.fnmatchcase(name, p))
            if rule.layer_types is not None and not is_candidate_type(module, types):
                continue
        elif is_candidate_type(module, types):
            views = layer_views(name, module, modules, per_head=rule.per_head, lora=rule.lora)
        else:
            continue
        for view in views:
            if patterns is not None:
                hit.update(p for p in patterns if fnmatch.fnmatchcase(view.name, p))
            exact = patterns is not None and (view.name in patterns or name in patterns)
            if patterns is not None and not exact and not _has_neuron_matrix(view):
                continue  # a wildcard passes over activations, norms and containers
            if rule.regex is not None and not (re.search(rule.regex, view.name) or re.search(rule.regex, name)):
                continue
            if _matches(view.name, rule.exclude) or _matches(name, rule.exclude):
                continue
            if not _in_target(view, rule, classifier):
                continue
            reason = _skip_reason(view, rule, exact, modules, check_weights)
            if reason is None:
                chosen.append(view)
            else:
                notes.append(Skipped(view.name, index, reason))
    for pattern in patterns or []:
        if pattern not in hit:
            raise ValueError(f"{where}: no layer matches `layers` pattern {pattern!r}; modules: {_some(modules)}")
    if not chosen and rule.required:
        detail = f"target={rule.target!r}, classifier={classifier!r}" if rule.target != "all" else ""
        if notes:
            left_out = "; ".join(f"{s.layer}: {s.reason}" for s in notes[:6])
            raise ValueError(f"{where}: every layer this rule matches is left out: {left_out}")
        raise ValueError(
            f"{where}: no layer of the model matches this rule (layers={rule.layers!r}, regex={rule.regex!r}, "
            f"layer_types={list(types)!r}, exclude={rule.exclude!r}{', ' + detail if detail else ''}); "
            f"modules: {_some(modules)}"
        )
    if skipped is not None:
        skipped.extend(notes)
    return chosen


def _has_neuron_matrix(view: LayerView) -> bool:
    full = view.source_shape()
    return full is None or len(full) >= 2


def resolve_rules(
    root: nn.Module, rules: Sequence[Rule], classifier: str | None, *, check_weights: bool = True
) -> Selection:
    """Bind every rule to its layers. A tensor gets each regularizer once: two rules with the
    same regularizer on one set of neurons (by name, or through a tied weight such as GPT-2's
    ``lm_head`` and ``wte``) are an error, unless their settings are identical, in which case it
    is penalised once and the summary names the twin."""
    selection = Selection()
    seen: dict[tuple[object, ...], Binding] = {}
    for index, rule in enumerate(rules):
        template = rule.build_regularizer()
        views = select_layers(root, rule, index, classifier, check_weights=check_weights, skipped=selection.skipped)
        if not views:
            selection.dropped.append((index, f"rule {index} ({rule.label}) selected no layer and is dropped"))
        for view in views:
            kind = (*view.identity(), template.name)
            other = seen.get(kind)
            if other is not None:
                if not same_rule(other.rule, rule):
                    raise ValueError(
                        f"layer {view.name!r} gets regularizer {template.name!r} from two different rules "
                        f"(rule {other.rule_index} on {other.layer_name!r} and rule {index}"
                        + (", a tied weight" if other.layer_name != view.name else "")
                        + "); make them disjoint with `exclude`, `target` or `layers`"
                    )
                if other.layer_name != view.name:
                    selection.skipped.append(
                        Skipped(view.name, index, f"shares its weight with {other.layer_name!r}: penalised once")
                    )
                continue
            binding = Binding(view, index, rule, template.spawn(view.name))
            seen[kind] = binding
            selection.bindings.append(binding)
    return selection


def same_rule(a: Rule, b: Rule) -> bool:
    return (
        a.build_regularizer().hparams() == b.build_regularizer().hparams()
        and a.coefficient == b.coefficient
        and a.effective_schedule == b.effective_schedule
    )


#: The papers' defaults: hidden layers in half-space with one coefficient, the classifier in full
#: space with another (MHE: NeurIPS 2018, CIFAR-100 CNN-9; the rest: AISTATS 2021).
PRESETS: dict[str, tuple[type[Regularizer], dict[str, Any], float, float]] = {
    "mhe": (MHE, {"power": 2.0}, 1.0, 10.0),
    "mhe-log": (MHE, {"power": 0.0}, 1.0, 10.0),
    "mhe-a1": (MHE, {"power": 1.0, "distance": "angular"}, 0.1, 1.0),
    "mhs": (MHS, {}, 0.1, 1.0),
    "mhp": (MHP, {}, 1.0, 10.0),
    "rmhp": (RMHP, {}, 0.01, 0.1),
    "mhc": (REGULARIZERS["mhc"], {}, 0.01, 0.1),
    "mgd": (MGD, {}, 0.01, 0.1),
    "comhe": (CoMHE, {"projection_dim": 40, "projections": 20}, 1.0, 10.0),
}


#: Presets for transformers: the papers' hidden-layer rule split by role, so that attention
#: projections (each of Q, K, V its own set of neurons) and MLP layers can be tuned apart.
TRANSFORMER_PRESETS: dict[str, str] = {"mhe-transformer": "mhe"}


def preset_rules(
    preset: str, *, layers: list[str] | None = None, exclude: Sequence[str] = (), max_neurons: int | None = MAX_NEURONS
) -> list[Rule]:
    """Rules reproducing a paper's defaults: hidden layers half-space, classifier full space.

    ``layers`` and ``exclude`` narrow every rule of the preset (glob patterns, as in
    `Rule`). The classifier rule is optional: on a model with no linear head, a 1-output
    head or a head larger than ``max_neurons`` (a tied LM head) it is dropped, and the selection
    summary says so; so are the hidden rules on a model whose hidden layers are all frozen (a
    fine-tuned head). The engine still refuses a model where no rule selects anything.
    ``"mhe-transformer"`` splits the hidden rule into ``target="attention"`` and ``target="mlp"``.

    Examples:
        >>> from lightning_hsu.rules import preset_rules
        >>> [(r.label, r.target, r.coefficient) for r in preset_rules("mhe")]
        [('mhe_hidden', 'hidden', 1.0), ('mhe_classifier', 'classifier', 10.0)]
    """
    base = TRANSFORMER_PRESETS.get(preset, preset)
    if base not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted([*PRESETS, *TRANSFORMER_PRESETS])}")
    cls, options, hidden_coefficient, classifier_coefficient = PRESETS[base]
    hidden_options = dict(options)
    if cls is not RMHP:
        hidden_options["half_space"] = True
    common: dict[str, Any] = {"layers": layers, "exclude": list(exclude), "max_neurons": max_neurons}
    hidden_targets: tuple[Target, ...] = ("attention", "mlp") if preset in TRANSFORMER_PRESETS else ("hidden",)
    rules = [
        Rule(
            cls.name,
            hidden_coefficient,
            options=dict(hidden_options),
            target=target,
            name=f"{cls.name}_{target}",
            required=False,
            **common,
        )
        for target in hidden_targets
    ]
    rules.append(
        Rule(
            cls.name,
            classifier_coefficient,
            options=dict(options),
            target="classifier",
            name=f"{cls.name}_classifier",
            required=False,
            **common,
        )
    )
    return rules
