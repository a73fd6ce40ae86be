"""Rules: which layers get which regularizer, with what coefficient and schedule.

A :class:`Rule` selects layers of a model (by type, glob or regex on the qualified module name,
explicit names, exclusions, and the hidden/classifier split of the papers) and says how to
regularise them. :func:`resolve_rules` turns rules and a model into per-layer bindings, with
errors that name the rule, the option or the layer at fault. Pure PyTorch.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from lightning_hsu.functional.neurons import neuron_count
from lightning_hsu.regularizers import MHE, MHP, MHS, RMHP, CoMHE, Regularizer, make_regularizer
from lightning_hsu.regularizers.registry import REGULARIZERS
from lightning_hsu.regularizers.separation import MGD
from lightning_hsu.schedules import Constant, Schedule

#: Module types selected when a rule names none.
DEFAULT_LAYER_TYPES: tuple[str, ...] = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
)

#: Path segments that wrappers insert into module names (FSDP1, activation checkpointing,
#: torch.compile); they are removed so that names are the ones a user sees in ``print(model)``.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

Target = Literal["all", "hidden", "classifier"]


@dataclass
class Rule:
    """One regularisation rule.

    Args:
        regularizer: a name from :data:`~lightning_hsu.regularizers.REGULARIZERS` (``"mhe"``,
            ``"mhs"``, ``"mhp"``, ``"mhc"``, ``"mgd"``, ``"rmhp"``, ``"comhe"``, ``"uniformity"``)
            or a :class:`~lightning_hsu.regularizers.Regularizer` instance.
        coefficient: :math:`\\lambda` (finite, >= 0).
        options: constructor options when ``regularizer`` is a name, e.g. ``{"half_space": True}``.
        layers: exact module names, or glob patterns (``fnmatch``) that select the matching modules
            having a 2+-D ``weight``; ``None`` = all modules of ``layer_types``. Every pattern must
            match at least one module.
        regex: a regular expression the qualified module name must match (``re.search``).
        layer_types: module class names (any class in the module's MRO counts); ``None`` =
            :data:`DEFAULT_LAYER_TYPES` (Linear, Conv*, ConvTranspose*).
        exclude: glob patterns of modules to leave out.
        target: ``"all"``, ``"hidden"`` (everything but the classifier) or ``"classifier"``.
        schedule: coefficient schedule over global steps (default constant).
        name: label used in logged keys (default: the regularizer's name).
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

    def validate(self, index: int) -> None:
        """Check the options that do not depend on a model; errors name the rule and option."""
        where = f"rule {index} ({self.label})"
        c = self.coefficient
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"{where}: `coefficient` must be a finite number >= 0, got {c!r}")
        if self.target not in ("all", "hidden", "classifier"):
            raise ValueError(f"{where}: `target` must be 'all', 'hidden' or 'classifier', got {self.target!r}")
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
    """One (layer, rule) pair: the layer's own regularizer instance and coefficient."""

    layer_name: str
    module: nn.Module
    rule_index: int
    rule: Rule
    regularizer: Regularizer

    @property
    def key(self) -> str:
        """Unique key, used for logging and for state: ``<layer>/<rule label>``."""
        return f"{self.layer_name}/{self.rule.label}"


def clean_module_name(name: str) -> str:
    """Drop wrapper segments (FSDP1, activation checkpointing, compile) from a module path."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    return ".".join(parts)


def user_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(clean name, module)`` for every module a user wrote, skipping wrapper modules."""
    seen: set[int] = set()
    for name, module in root.named_modules():
        cleaned = clean_module_name(name)
        if not cleaned or id(module) in seen:
            continue
        if type(module).__name__ in ("FullyShardedDataParallel", "CheckpointWrapper", "OptimizedModule"):
            continue
        seen.add(id(module))
        yield cleaned, module


def _is_type(module: nn.Module, names: Sequence[str]) -> bool:
    return any(cls.__name__ in names for cls in type(module).__mro__)


def find_classifier(root: nn.Module, classifier: str | None) -> str | None:
    """Name of the classifier: ``classifier`` if given, else the last Linear module registered."""
    modules = dict(user_modules(root))
    if classifier is None:
        return None
    if classifier != "auto":
        if classifier not in modules:
            raise ValueError(f"classifier layer {classifier!r} is not a module of the model; modules: {_some(modules)}")
        return classifier
    linear = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


def _some(modules: dict[str, nn.Module], limit: int = 12) -> str:
    names = list(modules)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _has_neurons(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and (weight.dim() >= 2 or type(module).__name__ in DEFAULT_LAYER_TYPES)


def _has_trainable_weight(module: nn.Module) -> bool:
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        return True
    # parametrized weights keep their parameters one level down (module.parametrizations)
    return any(p.requires_grad for p in module.parameters())


def select_layers(
    root: nn.Module, rule: Rule, index: int, classifier: str | None, *, check_weights: bool = True
) -> list[tuple[str, nn.Module]]:
    """The layers ``rule`` applies to, in registration order; errors name the rule and pattern.

    ``check_weights=False`` skips the checks of weight shape and ``requires_grad``, which cannot
    be made once a sharding strategy has replaced the weights by flat shards.
    """
    where = f"rule {index} ({rule.label})"
    modules = dict(user_modules(root))
    types = tuple(rule.layer_types) if rule.layer_types is not None else DEFAULT_LAYER_TYPES
    explicit = rule.layers is not None
    chosen: list[tuple[str, nn.Module]] = []
    for pattern in rule.layers or []:
        hits = [n for n in modules if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"{where}: no layer matches `layers` pattern {pattern!r}; modules: {_some(modules)}")
    for name, module in modules.items():
        if explicit:
            exact = name in (rule.layers or [])
            if not exact and not any(fnmatch.fnmatchcase(name, p) for p in rule.layers or []):
                continue
            if not exact and not _has_neurons(module):
                continue  # a wildcard passes over activations, norms and containers
        if not explicit and not _is_type(module, types):
            continue
        if explicit and rule.layer_types is not None and not _is_type(module, types):
            continue
        if rule.regex is not None and not re.search(rule.regex, name):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in rule.exclude):
            continue
        if rule.target == "hidden" and name == classifier:
            continue
        if rule.target == "classifier" and name != classifier:
            continue
        chosen.append((name, module))
    if not chosen:
        detail = f"target={rule.target!r}, classifier={classifier!r}" if rule.target != "all" else ""
        raise ValueError(
            f"{where}: no layer of the model matches this rule (layers={rule.layers!r}, regex={rule.regex!r}, "
            f"layer_types={list(types)!r}, exclude={rule.exclude!r}{', ' + detail if detail else ''}); "
            f"modules: {_some(modules)}"
        )
    for name, module in chosen if check_weights else []:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"{where}: layer {name!r} ({type(module).__name__}) has no tensor `weight` to regularise")
        if not _has_trainable_weight(module):
            raise ValueError(f"{where}: layer {name!r} has no parameter that requires grad (frozen?)")
        if weight.dim() >= 2 and neuron_count(module) < 2:
            raise ValueError(f"{where}: layer {name!r} has {neuron_count(module)} neuron; at least 2 are needed")
        if weight.dim() < 2:
            raise ValueError(
                f"{where}: layer {name!r} has a {weight.dim()}-D weight {tuple(weight.shape)}; "
                "hyperspherical penalties need one neuron per row"
            )
    return chosen


def resolve_rules(
    root: nn.Module, rules: Sequence[Rule], classifier: str | None, *, check_weights: bool = True
) -> list[Binding]:
    """Bind every rule to its layers. Two rules with the same regularizer on one layer are an
    error (ambiguous), unless they are identical, in which case the layer gets it once."""
    bindings: list[Binding] = []
    by_layer_and_kind: dict[tuple[str, str], Binding] = {}
    for index, rule in enumerate(rules):
        template = rule.build_regularizer()
        for name, module in select_layers(root, rule, index, classifier, check_weights=check_weights):
            kind = (name, template.name)
            if kind in by_layer_and_kind:
                other = by_layer_and_kind[kind]
                if _same_rule(other.rule, rule):
                    continue
                raise ValueError(
                    f"layer {name!r} gets regularizer {template.name!r} from two different rules "
                    f"(rule {other.rule_index} and rule {index}); make them disjoint with `exclude`, "
                    "`target` or `layers`"
                )
            binding = Binding(name, module, index, rule, template.spawn(name))
            by_layer_and_kind[kind] = binding
            bindings.append(binding)
    return bindings


def _same_rule(a: Rule, b: Rule) -> bool:
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


def preset_rules(preset: str) -> list[Rule]:
    """Rules reproducing a paper's defaults: hidden layers half-space, classifier full space."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cls, options, hidden_coefficient, classifier_coefficient = PRESETS[preset]
    hidden_options = dict(options)
    if cls is not RMHP:
        hidden_options["half_space"] = True
    return [
        Rule(cls.name, hidden_coefficient, options=hidden_options, target="hidden", name=f"{cls.name}_hidden"),
        Rule(
            cls.name, classifier_coefficient, options=dict(options), target="classifier", name=f"{cls.name}_classifier"
        ),
    ]
