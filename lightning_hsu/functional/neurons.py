r"""The neurons of a layer as the rows of a matrix `[n, d]`.

- `Linear(in, out)`: weight `[out, in]`, rows as they are.
- `ConvNd`: weight `[out, in/groups, *k]` → `[out, in/groups·prod(k)]`.
- `ConvTransposeNd`: weight `[in, out/groups, *k]`; the neurons are the *output* channels,
  so each group's block is transposed before flattening → `[out, in/groups·prod(k)]`.
- Hugging Face `Conv1D` (GPT-2 and its family): weight `[in, out]`; the neurons are its columns.
- `Embedding` (and a classifier's class vectors): rows as they are.
- A bare tensor or parameter with 2+ dimensions: the first dimension indexes neurons.

Parametrized weights (`torch.nn.utils.parametrize`, `weight_norm`) are read through the
parametrization, so the penalty sees — and differentiates through — the weight the layer uses.
A model's layers, attention projections split into Q, K and V included, are found and named by
`lightning_hsu.layers`.
"""

from __future__ import annotations

from torch import Tensor, nn

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_hf_conv1d(module: nn.Module) -> bool:
    """A Hugging Face `transformers.pytorch_utils.Conv1D`: a linear layer storing `[in, out]`."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def transpose_conv_neurons(weight: Tensor, groups: int) -> Tensor:
    """Rows = output channels of a `ConvTransposeNd` weight `[in, out/groups, *k]`."""
    in_channels, out_per_group = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *kernel)
    return grouped.transpose(1, 2).reshape(groups * out_per_group, -1)


def _weight_of(module: nn.Module, name: str) -> Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"layer '{name}' ({type(module).__name__}) has no tensor `weight`; "
            "select a module with a weight or pass the parameter itself"
        )
    return weight


def neurons_of(source: nn.Module | Tensor, *, name: str | None = None) -> Tensor:
    """Return the neurons of a layer, or of a weight tensor, as the rows of `[n, d]`.

    Args:
        source: a module (`Linear`, `Conv*`, `ConvTranspose*`, Hugging Face `Conv1D`,
            `Embedding` or any module with a 2+-D `weight`) or a tensor with 2+ dimensions.
        name: the layer's name, used in error messages.

    Raises:
        TypeError: the module has no tensor `weight`.
        ValueError: the weight has fewer than 2 dimensions (no neurons to compare).

    Examples:
        >>> from torch import nn
        >>> from lightning_hsu.functional import neurons_of
        >>> tuple(neurons_of(nn.Conv2d(3, 8, 3)).shape)  # 8 filters of 3 x 3 x 3
        (8, 27)
        >>> tuple(neurons_of(nn.ConvTranspose2d(8, 4, 3)).shape)  # the 4 output channels
        (4, 72)
    """
    label = name if name is not None else (type(source).__name__ if isinstance(source, nn.Module) else "tensor")
    if isinstance(source, nn.Module):
        weight = _weight_of(source, label)
        if isinstance(source, _CONV_TRANSPOSE):
            return transpose_conv_neurons(weight, source.groups)
        if is_hf_conv1d(source):
            return weight.t()
    elif isinstance(source, Tensor):
        weight = source
    else:
        raise TypeError(f"'{label}': expected an nn.Module or a Tensor, got {type(source).__name__}")
    if weight.dim() < 2:
        raise ValueError(
            f"layer '{label}' has a {weight.dim()}-D weight of shape {tuple(weight.shape)}: "
            "hyperspherical penalties need a weight with one neuron per row (2+ dimensions)"
        )
    return weight.reshape(weight.shape[0], -1)


def neuron_count(source: nn.Module | Tensor) -> int:
    """Number of neurons `n` of a layer or weight without materialising a reshaped copy."""
    if isinstance(source, nn.Module):
        weight = _weight_of(source, type(source).__name__)
        if isinstance(source, _CONV_TRANSPOSE):
            return int(weight.shape[1]) * source.groups
        if is_hf_conv1d(source):
            return int(weight.shape[1])
        return int(weight.shape[0])
    return int(source.shape[0])
