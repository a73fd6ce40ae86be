"""Selected means penalised, on the set-ups people use: parametrized weights (spectral/weight
norm), fine-tuning (frozen backbone, BitFit, PEFT LoRA), models without a usable linear head,
lazy layers, presets narrowed with ``exclude``/``layers``, and ``torch.compile``."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from models import TinyNet, assert_same_weights, mhe_reference, trainer_kwargs, weights
from real_models import Task, mhe_penalty, quiet_transformers, train, train_both
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.utils.data import TensorDataset

from lightning_hsu import HypersphericalUniformity, PenaltyEngine, Rule
from lightning_hsu.functional import hyperspherical_energy
from lightning_hsu.rules import preset_rules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def images(n: int = 8, classes: int = 5, size: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def hf_image_loss(net, batch):
    return net(pixel_values=batch[0], labels=batch[1]).loss


def plain_loss(net, batch):
    return nn.functional.cross_entropy(net(batch[0]), batch[1])


def bound(model: nn.Module, preset: str = "mhe", **kw) -> PenaltyEngine:
    engine = PenaltyEngine(preset_rules(preset, **kw))
    engine.bind(model)
    return engine


# -- parametrized weights ------------------------------------------------------------------------------
def resnet18(norm):
    transformers = pytest.importorskip("transformers")
    quiet_transformers()
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[2, 2, 2, 2], layer_type="basic", num_labels=5
    )
    net = transformers.ResNetForImageClassification(config)
    for module in list(net.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            norm(module)
    return net


@pytest.mark.parametrize("norm", [parametrizations.spectral_norm, parametrizations.weight_norm])
def test_resnet18_with_a_weight_parametrization_trains_like_hand_written(tmp_path, norm):
    """The penalty reads the weight the forward computed: one power iteration per step, as in
    the hand-written reference that reads the weights inside the same cached forward."""
    engine = bound(resnet18(norm))
    hidden = [b.view.module_name for b in engine.bindings if b.rule.label == "mhe_hidden"]
    assert len(hidden) == 20
    assert "half, the parametrized (effective) weight" in engine.summary()

    def loss_with_cached_weights(net, batch):
        return hf_image_loss(net, batch)

    class CachedTask(Task):
        def training_step(self, batch, batch_idx):
            with parametrize.cached():  # the weights the forward used, evaluated once
                loss = self.loss_fn(self.net, batch)
                return loss + self.penalty(self.net)

    def hidden_neurons(net):
        return [net.get_submodule(n).weight.flatten(1) for n in hidden]

    torch.manual_seed(0)
    net = resnet18(norm)
    import copy

    twin = copy.deepcopy(net)
    got = train(Task(net, hf_image_loss, images()), tmp_path / "cb", [HypersphericalUniformity()])
    reference = mhe_penalty(hidden_neurons, lambda n: [n.classifier[1].weight])
    expected = train(CachedTask(twin, loss_with_cached_weights, images(), reference), tmp_path / "ref", [])
    assert_same_weights(got, expected, atol=1e-5)  # power-iteration buffers included


def test_binding_a_spectral_norm_layer_has_no_side_effect():
    layer = nn.Linear(6, 4)
    parametrizations.spectral_norm(layer)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    engine = PenaltyEngine([Rule("mhe", layers=["0"])])
    engine.bind(nn.Sequential(layer))
    engine.summary()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- fine-tuning set-ups -------------------------------------------------------------------------------
def test_frozen_backbone_is_left_out_and_said_so(tmp_path):
    model = TinyNet()
    model.conv.requires_grad_(False)
    model.hidden.requires_grad_(False)
    engine = bound(model)
    assert [b.layer_name for b in engine.bindings] == ["fc"]
    assert {s.layer: s.reason for s in engine.selection.skipped} == {
        "conv": "frozen (requires_grad=False)",
        "hidden": "frozen (requires_grad=False)",
    }
    assert "left out: conv (rule 0): frozen" in engine.summary()
    assert "rule 0 (mhe_hidden) selected no layer and is dropped" in engine.summary()
    reference = TinyNet()
    reference.conv.requires_grad_(False)
    reference.hidden.requires_grad_(False)
    reference.penalty = lambda m: 10 * hyperspherical_energy(m.fc.weight)
    pl.Trainer(**trainer_kwargs(tmp_path / "ref")).fit(reference)
    pl.Trainer(**trainer_kwargs(tmp_path / "cb", callbacks=[HypersphericalUniformity()])).fit(model)
    assert_same_weights(weights(model), weights(reference))


def test_a_rule_with_only_frozen_layers_is_refused_before_training():
    model = TinyNet().requires_grad_(False)
    with pytest.raises(ValueError, match="no layer of the model is regularised by any rule; conv: frozen"):
        bound(model)
    with pytest.raises(ValueError, match="every layer this rule matches is left out: conv: frozen"):
        PenaltyEngine([Rule("mhe")]).bind(model)


def test_bitfit_trains_biases_only_and_costs_no_penalty(tmp_path):
    model = TinyNet()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    with pytest.raises(ValueError, match="no layer of the model is regularised by any rule; conv: frozen"):
        bound(model)


def test_layer_unfrozen_during_training_is_penalised_from_then_on():
    model = TinyNet()
    engine = PenaltyEngine([Rule("mhe", layers=["hidden", "fc"])])
    engine.tie_to_output = False
    engine.bind(model)
    model.hidden.requires_grad_(False)  # frozen after set-up (a fine-tuning schedule)
    engine.begin_step(0)
    engine.collect()
    engine.end_step()
    assert set(engine.last_values) == {"fc/mhe"}
    model.hidden.requires_grad_(True)
    engine.begin_step(1)
    engine.collect()
    engine.end_step()
    assert set(engine.last_values) == {"fc/mhe", "hidden/mhe"}


def _lora_model():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(12, 16)
            self.out = nn.Linear(16, 5)

        def forward(self, x):
            return self.out(torch.relu(self.body(x)))

    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["body"], init_lora_weights="gaussian")
    return peft.get_peft_model(Net(), config)


def test_peft_lora_base_weights_are_frozen_and_adapters_skipped_by_default():
    model = _lora_model()
    engine = PenaltyEngine([Rule("mhe", layer_types=["Linear"], required=False)])
    with pytest.raises(ValueError, match="no layer of the model is regularised"):
        engine.bind(model)
    skipped = PenaltyEngine([Rule("mhe", required=False), Rule("mhs", lora="update")])
    skipped.bind(model)
    assert [b.layer_name for b in skipped.bindings] == ["base_model.model.body"]
    reasons = {s.layer: s.reason for s in skipped.selection.skipped}
    assert reasons["base_model.model.body.lora_A.default"].startswith("inside a LoRA layer")
    assert reasons["base_model.model.out"] == "frozen (requires_grad=False)"


def test_peft_lora_update_is_regularised_on_request(tmp_path):
    def make():
        return _lora_model()

    def update(net):
        body = net.base_model.model.body
        a, b = body.lora_A["default"].weight, body.lora_B["default"].weight
        return [body.scaling["default"] * (b @ a)]  # ΔW = s·BA, [out, in]: rows are neurons

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g))
    rule = Rule("mhe", 1.0, options={"half_space": True}, lora="update")
    got, expected = train_both(
        make, plain_loss, data, mhe_penalty(update, lambda n: []), HypersphericalUniformity(rules=[rule]), tmp_path
    )
    assert_same_weights(got, expected, atol=1e-6)


# -- heads the presets must adapt to -----------------------------------------------------------------
class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1's layout (Iandola et al. 2016), narrowed: no linear layer, a conv classifier."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(16, 4, 8), Fire(16, 4, 8)
        )
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(16, classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1)


def test_squeezenet_without_a_linear_layer_gets_the_hidden_rule_and_the_classifier_rule_dropped(tmp_path):
    engine = bound(SqueezeNet())
    assert engine.classifier_name is None
    assert len(engine.bindings) == 8 and all(b.rule.label == "mhe_hidden" for b in engine.bindings)
    assert "rule 1 (mhe_classifier) selected no layer and is dropped" in engine.summary()
    convs = [b.view.module_name for b in engine.bindings]

    def hidden(net):
        return [net.get_submodule(n).weight.flatten(1) for n in convs]

    got, expected = train_both(
        SqueezeNet, plain_loss, images(), mhe_penalty(hidden, lambda n: []), HypersphericalUniformity(), tmp_path
    )
    assert_same_weights(got, expected)


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(x))).squeeze(-1)


@pytest.mark.parametrize("classifier", ["auto", None])
def test_one_output_regression_head_is_left_out_of_the_preset(classifier):
    engine = PenaltyEngine(preset_rules("mhe"), classifier=classifier)
    engine.bind(Regressor())
    assert [b.layer_name for b in engine.bindings] == ["hidden"]
    assert [s.reason for s in engine.selection.skipped] == ["1 neuron (at least 2 are needed)"]


def test_preset_narrowed_with_exclude_and_layers(tmp_path):
    cb = HypersphericalUniformity(preset="mhe", exclude=["conv"])
    cb.engine.bind(TinyNet())
    assert [(b.layer_name, b.rule.label) for b in cb.engine.bindings] == [
        ("hidden", "mhe_hidden"),
        ("fc", "mhe_classifier"),
    ]
    cb = HypersphericalUniformity(preset="mhe", layers=["conv", "fc"])
    cb.engine.bind(TinyNet())
    assert [(b.layer_name, b.rule.label) for b in cb.engine.bindings] == [
        ("conv", "mhe_hidden"),
        ("fc", "mhe_classifier"),
    ]
    with pytest.raises(ValueError, match="`preset` and `regularizer`"):
        HypersphericalUniformity("mhs", preset="mhe")


def test_huge_layers_are_left_out_unless_named():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 9000))
    engine = bound(model)
    assert [b.layer_name for b in engine.bindings] == ["0"]
    assert "9000 neurons > max_neurons=8192" in engine.summary()
    named = PenaltyEngine([Rule("mhe", layers=["2"])])
    named.bind(model)
    assert [b.layer_name for b in named.bindings] == ["2"]


# -- lazy layers ---------------------------------------------------------------------------------------
class LazyNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.hidden = nn.LazyLinear(8)


def test_lazy_layers_bind_at_set_up_and_train_like_hand_written(tmp_path):
    engine = bound(LazyNet())
    assert [b.layer_name for b in engine.bindings] == ["conv", "hidden", "fc"]
    assert "lazy (bound when materialised)" in engine.summary()
    runs = []
    for callbacks, penalty in (([HypersphericalUniformity()], None), ([], mhe_reference())):
        model = LazyNet()
        model.penalty = penalty
        torch.manual_seed(2)  # the lazy layer is materialised by the first training forward
        pl.Trainer(**trainer_kwargs(tmp_path / str(len(runs)), callbacks=callbacks)).fit(model)
        runs.append(weights(model))
    assert_same_weights(*runs)


# -- torch.compile ---------------------------------------------------------------------------------------
def test_whole_weight_penalties_add_no_graph_break_to_a_compiled_model():
    import torch._dynamo

    model = TinyNet()
    x = torch.randn(4, 1, 6, 6)
    torch._dynamo.reset()
    alone = torch._dynamo.explain(model)(x).graph_break_count
    engine = PenaltyEngine(preset_rules("mhe"))
    engine.tie_to_output = False  # single device and DDP: whole weights
    engine.bind(model)
    engine.install_hooks()
    engine.begin_step(0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    engine.collect()
    engine.end_step()
    assert explained.graph_break_count == alone == 0
    torch.testing.assert_close(
        sum(engine.last_weighted.values()),
        float(
            hyperspherical_energy(model.conv.weight.flatten(1), half_space=True)
            + hyperspherical_energy(model.hidden.weight, half_space=True)
            + 10 * hyperspherical_energy(model.fc.weight)
        ),
    )


def test_set_up_leaves_the_global_random_state_alone():
    """Binding must not draw random numbers: a user's seeded run (lazy layers materialised at the
    first step, dropout masks) would otherwise differ with the callback added."""
    model = nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, 16), nn.Linear(8, 3))
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    cb = HypersphericalUniformity(preset="mhe-transformer")
    cb.engine.bind(model)
    cb.summary()
    assert torch.equal(torch.random.get_rng_state(), before)
