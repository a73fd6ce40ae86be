"""The layers of a model as sets of neurons: naming, discovery and the axis of each kind of layer.

A layer's neurons are the rows of an ``[n, d]`` matrix read from one of its weight tensors. Most
layers store them as rows (`nn.Linear`, `nn.Embedding`, `nn.ConvNd`, flattened over the kernel);
others do not, and reading their weight's rows would silently regularise the wrong directions:

| layer | stored as | neurons |
|---|---|---|
| `nn.ConvTransposeNd` | `[in, out/groups, *k]` | output channels, each group's block transposed |
| Hugging Face `Conv1D` (GPT-2 and its family) | `[in, out]` | the columns |
| `nn.MultiheadAttention` | `in_proj_weight` `[3E, E]` | Q, K, V rows as three layers |
| its `out_proj` | read in the attention's forward | rows, hooked on the attention |
| fused Q/K/V (GPT-2 `c_attn`, timm's `qkv`) | `[3E, E]` (`Conv1D`: `[E, 3E]`) | Q, K, V as three layers |
| PEFT LoRA layers (`lora="update"`) | `base_layer`, `lora_A`, `lora_B` | rows of the update `scaling · B A` |

A `LayerView` names one such set of neurons and reads it; `layer_views` lists the
views of one module. A view whose module is never called on its own (`nn.MultiheadAttention`
reads `out_proj.weight` inside its own forward) records the module whose forward does run with
the weight whole (its `hook_module`), which the sharded strategies need.

Parametrized weights (`torch.nn.utils.parametrize`: `spectral_norm`, `weight_norm`, ...) are read
through the parametrization, so the penalty sees the weight the layer uses. Reading such a weight
can have side effects (`spectral_norm` runs a power iteration per read in training mode), so
shapes are taken without side effects (`LayerView.shape`). Pure PyTorch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from lightning_hsu.functional.neurons import is_hf_conv1d, transpose_conv_neurons

#: Path segments that wrappers insert into module names (FSDP1, activation checkpointing,
#: torch.compile, PEFT); removed so that names are the ones a user sees in ``print(model)``.
WRAPPER_SEGMENTS: tuple[str, ...] = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_WRAPPER_TYPES = ("FullyShardedDataParallel", "CheckpointWrapper", "OptimizedModule")

#: Module class names (any class of the module's MRO; globs allowed) selected when a rule names none.
DEFAULT_LAYER_TYPES: tuple[str, ...] = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Conv1D",
    "MultiheadAttention",
)

#: What a rule can regularise, for error messages.
SUPPORTED_KINDS = (
    "nn.Linear, nn.ConvNd, nn.ConvTransposeNd, nn.Embedding, nn.MultiheadAttention, Hugging Face Conv1D, "
    "PEFT LoRA layers (with lora='update'), or any module with a 2+-D `weight`"
)

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Names of fused query/key/value projections and the parts they hold, in storage order.
_FUSED_QKV = ("qkv", "c_attn")

Role = Literal["attention", "mlp", "conv", "embedding", "other"]
Layout = Literal["rows", "columns", "conv_transpose", "lora_update"]


def clean_module_name(name: str) -> str:
    """Drop wrapper segments (FSDP1, activation checkpointing, compile) from a module path."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)


def user_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(clean name, module)`` for every module a user wrote, skipping wrapper modules."""
    seen: set[int] = set()
    for name, module in root.named_modules():
        cleaned = clean_module_name(name)
        if not cleaned or id(module) in seen or type(module).__name__ in _WRAPPER_TYPES:
            continue
        seen.add(id(module))
        yield cleaned, module


def is_type(module: nn.Module | type, patterns: Sequence[str | type]) -> bool:
    """Whether a class of the module's (or class's) MRO is one of ``patterns`` (classes, names or
    name globs)."""
    mro = module.__mro__ if isinstance(module, type) else type(module).__mro__
    for pattern in patterns:
        if isinstance(pattern, type):
            if pattern in mro:
                return True
        elif any(fnmatch.fnmatchcase(cls.__name__, pattern) for cls in mro):
            return True
    return False


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer (``peft.tuners.lora.LoraLayer``): a frozen ``base_layer`` plus ``lora_A``/``lora_B``."""
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "base_layer")


def is_depthwise(module: nn.Module) -> bool:
    """A convolution whose every filter reads one input channel (MobileNet, EfficientNet, ConvNeXt)."""
    groups = getattr(module, "groups", 1)
    return isinstance(module, _CONV) and groups > 1 and module.in_channels == groups


def storage_key(weight: object) -> Hashable:
    """What two tied weights share: the same storage, offset, shape and strides (the same
    `Parameter` object included; a DTensor by its local shard)."""
    if not isinstance(weight, Tensor):
        return ("object", id(weight))
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return (
        local.untyped_storage().data_ptr(),
        local.storage_offset(),
        tuple(local.shape),
        local.stride(),
        local.dtype,
        str(local.device),
    )


def parametrization_of(module: nn.Module, attribute: str) -> nn.Module:
    """The ``ParametrizationList`` that computes ``module.<attribute>``."""
    return cast(nn.ModuleDict, module.parametrizations)[attribute]


def _no_side_effect_read(module: nn.Module, attribute: str) -> Tensor:
    """``getattr(module, attribute)`` for a parametrized weight, with the parametrization's buffers
    (``spectral_norm``'s power-iteration vectors) restored afterwards."""
    plist = parametrization_of(module, attribute)
    saved = [b.detach().clone() for b in plist.buffers()]
    with torch.no_grad():
        value = getattr(module, attribute)
        for buffer, old in zip(plist.buffers(), saved, strict=True):
            buffer.copy_(old)
    return value


@dataclass(eq=False)
class LayerView:
    """One set of neurons of a model: the rows ``part`` of the neuron matrix of ``module.attribute``.

    Attributes:
        name: the name used in logs, keys and errors: the module's name, or ``<module>.q`` /
            ``<module>.q_proj`` for one part of a fused attention projection (``.head<i>`` per head).
        module_name: the name of the module holding the weight.
        module: the module holding the weight.
        attribute: the weight's attribute on ``module``.
        layout: how the neurons are stored (see the module docstring).
        part: ``(start, stop)`` rows of the neuron matrix, or ``None`` for all of them.
        hook_module: the module whose forward runs with this weight whole.
        role: ``"attention"``, ``"mlp"``, ``"conv"``, ``"embedding"`` or ``"other"``.
    """

    name: str
    module_name: str
    module: nn.Module
    attribute: str = "weight"
    layout: Layout = "rows"
    part: tuple[int, int] | None = None
    hook_module: nn.Module | None = None
    role: Role = "other"

    def __post_init__(self) -> None:
        if self.hook_module is None:
            self.hook_module = self.module

    # -- reading ----------------------------------------------------------------------------------
    @property
    def parametrized(self) -> bool:
        return self.layout != "lora_update" and parametrize.is_parametrized(self.module, self.attribute)

    def source(self) -> Tensor:
        """The tensor the neurons are read from (for a parametrized weight this evaluates it)."""
        if self.layout == "lora_update":
            return lora_update(self.module)
        value = getattr(self.module, self.attribute, None)
        if not isinstance(value, Tensor):
            raise TypeError(f"layer {self.name!r} ({type(self.module).__name__}) has no tensor `{self.attribute}`")
        return value

    def neurons_from(self, weight: Tensor) -> Tensor:
        """The ``[n, d]`` neurons of this view from ``weight``, a tensor shaped like `source`."""
        if self.layout == "columns":
            matrix = weight.t()
        elif self.layout == "conv_transpose":
            matrix = transpose_conv_neurons(weight, self.module.groups)  # type: ignore[arg-type]
        else:
            matrix = weight.reshape(weight.shape[0], -1)
        if self.part is not None:
            matrix = matrix[self.part[0] : self.part[1]]
        return matrix

    def neurons(self) -> Tensor:
        return self.neurons_from(self.source())

    # -- facts read without side effects --------------------------------------------------------
    def source_shape(self) -> tuple[int, ...] | None:
        """Shape of `source` (``None`` while a lazy module is not materialised)."""
        if self.layout == "lora_update":
            out_features = getattr(self.module, "out_features", None)
            in_features = getattr(self.module, "in_features", None)
            return (int(out_features), int(in_features)) if out_features and in_features else None
        if self.parametrized:
            return tuple(_no_side_effect_read(self.module, self.attribute).shape)
        value = getattr(self.module, self.attribute, None)
        if not isinstance(value, Tensor) or is_lazy(value):
            return None
        return tuple(value.shape)

    def shape(self) -> tuple[int, int] | None:
        """``(n, d)``: neurons and their dimension (``None`` while a lazy module is not materialised)."""
        full = self.source_shape()
        if full is None:
            return None
        if len(full) < 2:
            return (int(full[0]), 1) if full else (0, 0)
        return tuple(self.neurons_from(torch.empty(full, device="meta")).shape)  # type: ignore[return-value]

    def parameters(self) -> list[Tensor]:
        """The trainable tensors behind the neurons (originals of a parametrization, LoRA factors)."""
        if self.layout == "lora_update":
            return [p for key in _active_adapters(self.module) for p in _lora_factors(self.module, key)]
        if self.parametrized:
            return list(parametrization_of(self.module, self.attribute).parameters())
        value = getattr(self.module, self.attribute, None)
        if isinstance(value, nn.Parameter):
            return [value]
        # old-style hooks keep the parameter as `<name>_orig` (spectral_norm) or `<name>_g/_v` (weight_norm)
        own = dict(self.module.named_parameters(recurse=False))
        behind: list[Tensor] = [p for key, p in own.items() if key.startswith(self.attribute + "_")]
        if behind or not isinstance(value, Tensor):
            return behind
        return [value]  # a view into a flat parameter (FSDP1): it requires grad as the parameter does

    def trainable(self) -> bool:
        """Whether any tensor behind the neurons requires grad (frozen layers cost nothing)."""
        return any(p.requires_grad for p in self.parameters())

    def identity(self) -> tuple[int, ...]:
        """The same for two views of one tensor's same neurons (tied weights)."""
        params = self.parameters()
        anchor = id(params[0]) if params else id(self.module)
        part = self.part or (0, -1)
        return (anchor, hash(self.layout), *part)


def _active_adapters(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    keys = [active] if isinstance(active, str) else list(active)
    return [k for k in keys if k in cast(nn.ModuleDict, module.lora_A)]


def _lora_factors(module: nn.Module, key: str) -> tuple[Tensor, Tensor]:
    a = cast(nn.ModuleDict, module.lora_A)[key]
    b = cast(nn.ModuleDict, module.lora_B)[key]
    return cast(Tensor, a.weight), cast(Tensor, b.weight)


def lora_update(module: nn.Module) -> Tensor:
    """``Σ_adapters scaling · B A`` of a PEFT LoRA linear layer: ``[out, in]``, rows are neurons."""
    total: Tensor | None = None
    for key in _active_adapters(module):
        a, b = _lora_factors(module, key)
        update = module.scaling[key] * (b @ a)  # type: ignore[index]
        total = update if total is None else total + update
    if total is None:
        raise ValueError(f"LoRA layer {type(module).__name__} has no active adapter")
    return total


def ancestors(name: str, modules: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """The modules that contain the module named ``name``, nearest first (the root left out)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = modules.get(".".join(parts[:depth]))
        if parent is not None:
            yield parent


def _in_attention(name: str, modules: dict[str, nn.Module]) -> bool:
    return any("attention" in (cls := type(a).__name__.lower()) or "attn" in cls for a in ancestors(name, modules))


def _role(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> Role:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.MultiheadAttention) or _in_attention(name, modules):
        return "attention"
    if isinstance(module, (*_CONV, *_CONV_TRANSPOSE)):
        return "conv"
    if isinstance(module, nn.Linear) or is_hf_conv1d(module) or is_lora_layer(module):
        return "mlp"
    return "other"


def _split(view: LayerView, labels: Sequence[str], size: int) -> list[LayerView]:
    return [
        LayerView(
            f"{view.name}.{label}",
            view.module_name,
            view.module,
            view.attribute,
            view.layout,
            (i * size, (i + 1) * size),
            view.hook_module,
            view.role,
        )
        for i, label in enumerate(labels)
    ]


def _per_head(views: list[LayerView], heads: int) -> list[LayerView]:
    out: list[LayerView] = []
    for view in views:
        start, stop = view.part if view.part is not None else (0, (view.shape() or (0, 0))[0])
        size = (stop - start) // heads
        for h in range(heads):
            out.append(
                LayerView(
                    f"{view.name}.head{h}",
                    view.module_name,
                    view.module,
                    view.attribute,
                    view.layout,
                    (start + h * size, start + (h + 1) * size),
                    view.hook_module,
                    view.role,
                )
            )
    return out


def _heads_of(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> int | None:
    parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
    for owner in (module, parent):
        for attr in ("num_heads", "num_attention_heads", "n_head", "n_heads"):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def layer_views(
    name: str, module: nn.Module, modules: dict[str, nn.Module], *, per_head: bool = False, lora: str = "skip"
) -> list[LayerView]:
    """The sets of neurons of ``module`` (named ``name`` in ``modules``), as listed in the module
    docstring; empty for a module with no neuron matrix. ``per_head`` splits every attention
    projection into its heads (the rows of one head's slice); ``lora="update"`` reads a PEFT LoRA
    layer's update."""
    role = _role(name, module, modules)
    if is_lora_layer(module):
        return [LayerView(name, name, module, layout="lora_update", role=role)] if lora == "update" else []
    parent_name = name.rsplit(".", 1)[0] if "." in name else ""
    parent = modules.get(parent_name)
    views: list[LayerView]
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        if module._qkv_same_embed_dim:
            whole = LayerView(f"{name}", name, module, "in_proj_weight", role="attention")
            views = _split(whole, ("q_proj", "k_proj", "v_proj"), e)
        else:
            views = [
                LayerView(f"{name}.{p}", name, module, f"{p}_weight", role="attention")
                for p in ("q_proj", "k_proj", "v_proj")
            ]
        return _per_head(views, module.num_heads) if per_head else views
    if is_hf_conv1d(module):
        view = LayerView(name, name, module, layout="columns", role=role)
    elif isinstance(module, _CONV_TRANSPOSE):
        view = LayerView(name, name, module, layout="conv_transpose", role=role)
    elif parametrize.is_parametrized(module, "weight") or isinstance(getattr(module, "weight", None), Tensor):
        view = LayerView(name, name, module, role=role)  # (a parametrized weight is not evaluated here)
    else:
        return []
    if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
        view.hook_module = parent  # its weight is read inside the attention's forward, never called itself
        view.role = "attention"
    views = [view]
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _FUSED_QKV and (isinstance(module, nn.Linear) or is_hf_conv1d(module)):
        n_out = module.nf if is_hf_conv1d(module) else module.out_features
        n_in = module.nx if is_hf_conv1d(module) else module.in_features
        if isinstance(n_out, int) and isinstance(n_in, int) and n_in > 0 and n_out in (2 * n_in, 3 * n_in):
            view.role = "attention"
            views = _split(view, ("q", "k", "v")[3 - n_out // n_in :], n_in)
    if per_head and view.role == "attention":
        heads = _heads_of(name, module, modules)
        if heads is None:
            raise ValueError(
                f"layer {name!r}: per_head=True needs the number of heads, which neither it nor its parent "
                "states (`num_heads`, `num_attention_heads` or `n_head`)"
            )
        views = _per_head(views, heads)
    return views


def is_candidate_type(module: nn.Module, types: Sequence[str | type]) -> bool:
    """Whether ``module`` is one of ``types`` (the rule's), counting a Hugging Face ``Conv1D`` and
    a PEFT LoRA layer as linear layers."""
    if is_type(module, types):
        return True
    linear = is_type(nn.Linear, types)
    return linear and (is_hf_conv1d(module) or is_lora_layer(module))


def within_lora_layer(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether ``name`` is a part of a PEFT LoRA layer (its ``base_layer`` or an adapter factor)."""
    return any(is_lora_layer(a) for a in ancestors(name, modules))


def lazy(view: LayerView) -> bool:
    """Whether the view's weight is not materialised yet (``LazyLinear``, ``LazyConv*``)."""
    if view.layout == "lora_update" or view.parametrized:
        return False
    value = getattr(view.module, view.attribute, None)
    return isinstance(value, Tensor) and is_lazy(value)
