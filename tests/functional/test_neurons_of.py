"""``neurons_of``: the rows of ``[n, d]`` are the layer's neurons, for every layer kind.

Each expected matrix is built independently, output channel by output channel, from what the
layer actually computes (for transposed convolutions: the response of an output channel to a unit
impulse on each input channel of its group).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import lightning_hsu.functional as F
from lightning_hsu.functional import neuron_count, neurons_of


def _seed() -> None:
    torch.manual_seed(0)


def test_linear_neurons_are_the_rows_of_the_weight() -> None:
    _seed()
    layer = nn.Linear(7, 5)
    rows = neurons_of(layer)
    assert rows.shape == (5, 7)
    x = torch.randn(7)
    # neuron o is the vector whose dot product with the input gives output o (bias aside)
    torch.testing.assert_close(rows @ x, layer(x) - layer.bias)
    assert neuron_count(layer) == 5


CONVS = [
    pytest.param(nn.Conv1d, 6, 9, (3,), 1, id="conv1d"),
    pytest.param(nn.Conv1d, 6, 9, (3,), 3, id="conv1d-groups3"),
    pytest.param(nn.Conv2d, 4, 6, (3, 2), 1, id="conv2d"),
    pytest.param(nn.Conv2d, 4, 6, (3, 2), 2, id="conv2d-groups2"),
    pytest.param(nn.Conv2d, 4, 8, (1, 1), 4, id="conv2d-depthwise-x2"),
    pytest.param(nn.Conv3d, 2, 4, (2, 2, 2), 1, id="conv3d"),
    pytest.param(nn.Conv3d, 4, 6, (1, 2, 3), 2, id="conv3d-groups2"),
]


@pytest.mark.parametrize(("cls", "cin", "cout", "k", "groups"), CONVS)
def test_conv_neuron_is_the_filter_applied_to_its_input_patch(cls, cin, cout, k, groups) -> None:  # type: ignore[no-untyped-def]
    _seed()
    layer = cls(cin, cout, k, groups=groups, bias=False)
    rows = neurons_of(layer)
    per_group = cin // groups
    assert rows.shape == (cout, per_group * int(torch.tensor(k).prod()))
    assert neuron_count(layer) == cout
    # A single patch of the kernel's size: output channel o = <neuron o, its group's input patch>.
    x = torch.randn(1, cin, *k)
    out = layer(x).reshape(cout)
    for o in range(cout):
        g = o // (cout // groups)
        patch = x[0, g * per_group : (g + 1) * per_group].reshape(-1)
        torch.testing.assert_close(rows[o] @ patch, out[o], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows[o], layer.weight[o].reshape(-1))


TRANSPOSED = [
    pytest.param(nn.ConvTranspose1d, 6, 4, (3,), 1, id="convT1d"),
    pytest.param(nn.ConvTranspose1d, 6, 4, (3,), 2, id="convT1d-groups2"),
    pytest.param(nn.ConvTranspose2d, 4, 6, (2, 3), 1, id="convT2d"),
    pytest.param(nn.ConvTranspose2d, 6, 9, (2, 2), 3, id="convT2d-groups3"),
    pytest.param(nn.ConvTranspose3d, 3, 2, (2, 1, 2), 1, id="convT3d"),
    pytest.param(nn.ConvTranspose3d, 4, 6, (1, 2, 2), 2, id="convT3d-groups2"),
]


@pytest.mark.parametrize(("cls", "cin", "cout", "k", "groups"), TRANSPOSED)
def test_conv_transpose_neurons_are_output_channels_collected_from_their_group(cls, cin, cout, k, groups) -> None:  # type: ignore[no-untyped-def]
    _seed()
    layer = cls(cin, cout, k, groups=groups, bias=False)
    rows = neurons_of(layer)
    in_per_group, out_per_group = cin // groups, cout // groups
    assert rows.shape == (cout, in_per_group * int(torch.tensor(k).prod()))
    assert neuron_count(layer) == cout
    # Independent construction 1: for output channel o, the weights connecting it, input channel
    # by input channel of its group (weight is [in, out/groups, *k]).
    expected = torch.stack(
        [
            torch.cat(
                [
                    layer.weight[c, o % out_per_group].reshape(-1)
                    for c in range((o // out_per_group) * in_per_group, (o // out_per_group + 1) * in_per_group)
                ]
            )
            for o in range(cout)
        ]
    )
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    # Independent construction 2, from the layer's behaviour: a unit impulse on input channel c
    # (1 pixel) makes output channel o show exactly the kernel connecting c to o.
    with torch.no_grad():
        for o in range(cout):
            g = o // out_per_group
            responses = []
            for c in range(g * in_per_group, (g + 1) * in_per_group):
                x = torch.zeros(1, cin, *([1] * len(k)))
                x[0, c] = 1.0
                responses.append(layer(x)[0, o].reshape(-1))
            torch.testing.assert_close(rows[o], torch.cat(responses), rtol=1e-6, atol=1e-6)


def test_embedding_neurons_are_the_rows() -> None:
    _seed()
    emb = nn.Embedding(11, 4)
    torch.testing.assert_close(neurons_of(emb), emb.weight, rtol=0, atol=0)
    assert neuron_count(emb) == 11


def test_bare_parameter_with_two_or_more_dims_has_first_dim_as_neurons() -> None:
    _seed()
    p2 = nn.Parameter(torch.randn(5, 3))
    p4 = nn.Parameter(torch.randn(5, 2, 3, 2))
    torch.testing.assert_close(neurons_of(p2), p2, rtol=0, atol=0)
    rows = neurons_of(p4)
    assert rows.shape == (5, 12)
    for i in range(5):
        torch.testing.assert_close(rows[i], p4[i].flatten(), rtol=0, atol=0)
    # and the gradient reaches the parameter through the reshape
    F.hyperspherical_energy(rows).backward()
    assert p4.grad is not None and torch.isfinite(p4.grad).all() and p4.grad.abs().sum() > 0


def test_neurons_of_is_differentiable_view_for_module_weights() -> None:
    _seed()
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    F.hyperspherical_energy(neurons_of(conv), half_space=True).backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


class _Doubled(nn.Module):
    """A custom parametrization: the layer uses 2 * original with its last column zeroed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(x)
        mask[:, -1] = 0.0
        return 2.0 * x * mask


def test_custom_parametrization_is_read_through_and_gradient_reaches_original() -> None:
    _seed()
    layer = nn.Linear(4, 6)
    parametrize.register_parametrization(layer, "weight", _Doubled())
    original = layer.parametrizations.weight.original
    rows = neurons_of(layer)
    torch.testing.assert_close(rows, 2.0 * original.detach() * torch.tensor([1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(rows, layer.weight)
    F.hyperspherical_energy(rows, power=2.0).backward()
    assert original.grad is not None
    assert original.grad[:, :3].abs().sum() > 0
    assert torch.equal(original.grad[:, 3], torch.zeros(6))  # masked by the parametrization


def test_weight_norm_parametrization_gradient_flows_to_magnitude_and_direction() -> None:
    _seed()
    layer = parametrizations.weight_norm(nn.Conv2d(3, 5, 3))
    g = layer.parametrizations.weight.original0  # magnitude [5, 1, 1, 1]
    v = layer.parametrizations.weight.original1  # direction [5, 3, 3, 3]
    rows = neurons_of(layer)
    assert rows.shape == (5, 27)
    expected = (g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).reshape(5, -1)
    torch.testing.assert_close(rows, expected.detach())
    # R-MHP uses raw weights, so the magnitudes get a gradient too; MHE reaches the directions.
    (F.relaxed_polarization(rows) + F.hyperspherical_energy(rows)).backward()
    assert g.grad is not None and torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_one_dimensional_weight_raises_value_error_naming_the_module() -> None:
    norm = nn.LayerNorm(8)
    with pytest.raises(ValueError, match="LayerNorm"):
        neurons_of(norm)
    with pytest.raises(ValueError, match=r"encoder\.norm"):
        neurons_of(norm, name="encoder.norm")
    with pytest.raises(ValueError, match="tensor"):
        neurons_of(torch.randn(8))


def test_module_without_weight_raises_type_error_naming_the_module() -> None:
    with pytest.raises(TypeError, match="ReLU"):
        neurons_of(nn.ReLU())
    with pytest.raises(TypeError, match=r"head\.act"):
        neurons_of(nn.ReLU(), name="head.act")


def test_non_module_non_tensor_source_is_rejected() -> None:
    with pytest.raises(TypeError):
        neurons_of([[1.0, 2.0]])  # type: ignore[arg-type]
