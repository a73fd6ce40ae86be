"""The callback on architectures nobody here wrote: GPT-2, BERT, ViT, ConvNeXt and ResNet from
`transformers` configs (random init, no download) and `torch.nn.Transformer` layers.

For each: which layers the presets select, that each set of neurons lies on the layer's output
axis (read off the layer's own forward), and that training with the callback equals the same
model trained with the MHE preset written by hand on those layers (GPT-2 also with MHS and MGD,
against autograd through their official formulas in float64).
"""

from __future__ import annotations

import pytest
import torch
from functional import official  # the official formulas, as the parity tests state them
from models import assert_same_weights
from real_models import linear_neurons_by_forward, mhe_penalty, quiet_transformers, train_both
from torch import nn
from torch.utils.data import TensorDataset

from lightning_hsu import HypersphericalUniformity, PenaltyEngine, Rule
from lightning_hsu.functional import hyperspherical_energy, neurons_of
from lightning_hsu.rules import preset_rules

transformers = pytest.importorskip("transformers")
quiet_transformers()

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def bound(model: nn.Module, preset: str = "mhe", **kw) -> PenaltyEngine:
    engine = PenaltyEngine(preset_rules(preset, **kw))
    engine.bind(model)
    return engine


def names(engine: PenaltyEngine, rule: str | None = None) -> list[str]:
    return [b.layer_name for b in engine.bindings if rule is None or b.rule.label == rule]


# -- GPT-2 (Hugging Face Conv1D, fused c_attn, tied LM head) ----------------------------------------
E = 32


def gpt2(vocab: int = 50257):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=E, n_head=4, vocab_size=vocab, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # the two runs must see the same forward
    return transformers.GPT2LMHeadModel(config)


def lm_data(vocab: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, vocab, (12, 12), generator=g))


def lm_loss(net, batch):
    return net(input_ids=batch[0], labels=batch[0]).loss


def gpt2_hidden(net) -> list[torch.Tensor]:
    out = []
    for block in net.transformer.h:
        fused = block.attn.c_attn.weight  # [E, 3E]: y = x W + b, so the neurons are the columns
        out += [fused[:, :E].t(), fused[:, E : 2 * E].t(), fused[:, 2 * E :].t()]
        out += [block.attn.c_proj.weight.t(), block.mlp.c_fc.weight.t(), block.mlp.c_proj.weight.t()]
    return out


def test_gpt2_preset_selects_q_k_v_projections_and_mlp_and_leaves_out_the_huge_tied_head():
    engine = bound(gpt2())
    block = [f"attn.c_attn.{p}" for p in "qkv"] + ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert names(engine) == [f"transformer.h.{i}.{layer}" for i in range(2) for layer in block]
    assert any(s.layer == "lm_head" and "50257 neurons > max_neurons" in s.reason for s in engine.selection.skipped)
    assert "rule 1 (mhe_classifier) selected no layer and is dropped" in engine.summary()


def test_gpt2_neurons_are_the_conv1d_columns_split_into_q_k_v():
    model = gpt2()
    engine = bound(model)
    for b in engine.bindings:
        module = b.view.module
        by_forward = linear_neurons_by_forward(module, module.nx)  # [nf, nx]
        start, stop = b.view.part or (0, module.nf)
        torch.testing.assert_close(b.view.neurons().detach(), by_forward[start:stop], atol=1e-5, rtol=1e-5)
        assert b.view.shape() == (stop - start, module.nx)
        torch.testing.assert_close(neurons_of(module).detach(), by_forward, atol=1e-5, rtol=1e-5)
    # GPT-2 splits c_attn's output into q, k, v in that order
    attn = model.transformer.h[0].attn
    x = torch.randn(3, E)
    q, k, v = (attn.c_attn(x) - attn.c_attn.bias).split(E, dim=-1)
    views = {b.layer_name.rsplit(".", 1)[-1]: b.view for b in engine.bindings[:3]}
    for label, y in zip("qkv", (q, k, v), strict=True):
        torch.testing.assert_close(y, x @ views[label].neurons().detach().t(), atol=1e-5, rtol=1e-5)


def test_gpt2_trains_like_the_preset_written_by_hand(tmp_path):
    got, expected = train_both(
        gpt2, lm_loss, lm_data(50257), mhe_penalty(gpt2_hidden, lambda net: []), HypersphericalUniformity(), tmp_path
    )
    assert_same_weights(got, expected, atol=1e-5)


@pytest.mark.parametrize(("name", "reference"), [("mhs", official.hard_mhs), ("mgd", official.mgd)])
def test_gpt2_trains_with_mhs_and_mgd_like_their_official_formulas_in_float64(tmp_path, name, reference):
    # the separation and the Gram determinant have their own code outside the pair sums: checked
    # here on GPT-2's hidden layers against autograd through the concatenated float64 formulas
    rule = Rule(name, 0.5, options={"half_space": True, "eps": official.OFFICIAL_EPS}, target="hidden")
    engine = PenaltyEngine([rule])
    engine.bind(gpt2())
    assert len(engine.bindings) == len(gpt2_hidden(gpt2())) == 12

    def by_hand(net: nn.Module) -> torch.Tensor:
        return 0.5 * sum(reference(w.double(), half_space=True) for w in gpt2_hidden(net)).float()

    got, expected = train_both(gpt2, lm_loss, lm_data(50257), by_hand, HypersphericalUniformity(rules=[rule]), tmp_path)
    assert_same_weights(got, expected, atol=1e-5)


def test_gpt2_tied_embedding_and_head_are_penalised_once(tmp_path):
    model = gpt2(vocab=64)
    assert model.lm_head.weight is model.transformer.wte.weight
    engine = PenaltyEngine([Rule("mhe", 2.0, layers=["transformer.wte", "lm_head"])])
    engine.bind(model)
    assert names(engine) == ["transformer.wte"]
    assert [s.reason for s in engine.selection.skipped] == ["shares its weight with 'transformer.wte': penalised once"]
    got, expected = train_both(
        lambda: gpt2(vocab=64),
        lm_loss,
        lm_data(64),
        lambda net: 2.0 * hyperspherical_energy(net.transformer.wte.weight),
        HypersphericalUniformity(rules=[Rule("mhe", 2.0, layers=["net.lm_head", "net.transformer.wte"])]),
        tmp_path,
    )
    assert_same_weights(got, expected, atol=1e-5)


# -- BERT (separate query/key/value Linears; reentrant activation checkpointing) -----------------------
def bert():
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=E,
        num_attention_heads=4,
        intermediate_size=48,
        vocab_size=100,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def cls_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 100, (12, 10), generator=g), torch.randint(0, 3, (12,), generator=g))


def cls_loss(net, batch):
    return net(input_ids=batch[0], labels=batch[1]).loss


def bert_hidden(net) -> list[torch.Tensor]:
    out = []
    for layer in net.bert.encoder.layer:
        attention = layer.attention
        out += [attention.self.query.weight, attention.self.key.weight, attention.self.value.weight]
        out += [attention.output.dense.weight, layer.intermediate.dense.weight, layer.output.dense.weight]
    return [*out, net.bert.pooler.dense.weight]


def test_bert_transformer_preset_splits_attention_and_mlp_roles():
    engine = bound(bert(), "mhe-transformer")
    attention = names(engine, "mhe_attention")
    assert attention[:4] == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.0.attention.output.dense",
    ]
    assert len(attention) == 8
    assert names(engine, "mhe_mlp") == [
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.dense",
        "bert.pooler.dense",
    ]
    assert names(engine, "mhe_classifier") == ["classifier"]


@pytest.mark.parametrize("checkpointing", [None, True, False], ids=["plain", "reentrant", "non-reentrant"])
def test_bert_trains_like_the_preset_written_by_hand(tmp_path, checkpointing):
    def make():
        net = bert()
        if checkpointing is not None:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        return net

    callback = HypersphericalUniformity()
    reference = mhe_penalty(bert_hidden, lambda net: [net.classifier.weight])
    got, expected = train_both(make, cls_loss, cls_data(), reference, callback, tmp_path)
    assert_same_weights(got, expected, atol=1e-5)
    assert set(callback.engine.last_values) == {b.key for b in callback.engine.bindings}  # all 15 penalised


# -- torch.nn.Transformer (MultiheadAttention: in_proj split, out_proj read outside its forward) ----------
class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, 4, 48, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def seq_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(12, 5, E, generator=g), torch.randint(0, 3, (12,), generator=g))


def seq_loss(net, batch):
    return nn.functional.cross_entropy(net(batch[0]), batch[1])


def encoder_hidden(net) -> list[torch.Tensor]:
    out = []
    for layer in net.encoder.layers:
        q, k, v = layer.self_attn.in_proj_weight.chunk(3)
        out += [q, k, v, layer.self_attn.out_proj.weight, layer.linear1.weight, layer.linear2.weight]
    return out


def test_multihead_attention_is_three_projections_and_its_out_proj():
    model = Encoder()
    engine = bound(model)
    attn = "encoder.layers.0.self_attn"
    assert names(engine)[:6] == [
        f"{attn}.q_proj",
        f"{attn}.k_proj",
        f"{attn}.v_proj",
        f"{attn}.out_proj",
        "encoder.layers.0.linear1",
        "encoder.layers.0.linear2",
    ]
    assert names(engine, "mhe_classifier") == ["head"]
    # q, k, v as the attention computes them (torch's own packed in-projection)
    mha = model.encoder.layers[0].self_attn
    x = torch.randn(4, E)
    zero = torch.zeros(3 * E)
    projected = nn.functional._in_projection_packed(x, x, x, mha.in_proj_weight, zero)
    for view, y in zip([b.view for b in engine.bindings[:3]], projected, strict=True):
        torch.testing.assert_close(y, x @ view.neurons().detach().t())
    assert engine.bindings[3].view.hook_module is mha  # out_proj's forward is never called


def test_per_head_splits_each_projection_into_its_heads_rows():
    model = Encoder()
    engine = PenaltyEngine([Rule("mhe", layers=["encoder.layers.0.self_attn"], per_head=True)])
    engine.bind(model)
    assert len(engine.bindings) == 12
    head = engine.bindings[5]  # k, head 1
    assert head.layer_name == "encoder.layers.0.self_attn.k_proj.head1"
    torch.testing.assert_close(head.view.neurons(), model.encoder.layers[0].self_attn.in_proj_weight[E + 8 : E + 16])


def test_transformer_encoder_trains_like_the_preset_written_by_hand(tmp_path):
    callback = HypersphericalUniformity()
    reference = mhe_penalty(encoder_hidden, lambda net: [net.head.weight])
    got, expected = train_both(Encoder, seq_loss, seq_data(), reference, callback, tmp_path)
    assert_same_weights(got, expected, atol=1e-5)
    assert set(callback.engine.last_values) == {b.key for b in callback.engine.bindings}  # out_proj included


# -- ViT, ConvNeXt (depthwise convs), ResNet ---------------------------------------------------------
def vit():
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=E, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
    )
    config.num_labels = 5
    return transformers.ViTForImageClassification(config)


def convnext():
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=16)
    config.num_labels = 5
    return transformers.ConvNextForImageClassification(config)


def image_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g))


def image_loss(net, batch):
    return net(pixel_values=batch[0], labels=batch[1]).loss


def modules_of(net, names_: list[str]) -> list[torch.Tensor]:
    return [net.get_submodule(n).weight for n in names_]


def test_vit_trains_like_the_preset_written_by_hand(tmp_path):
    engine = bound(vit())
    hidden = names(engine, "mhe_hidden")
    # the patch embedding, Q, K, V and output projections, and the two MLP layers
    assert len(hidden) == 7 and hidden[0] == "vit.embeddings.patch_embeddings.projection"
    assert names(engine, "mhe_classifier") == ["classifier"]

    def reference_hidden(net):
        w = modules_of(net, hidden)
        return [w[0].reshape(w[0].shape[0], -1), *w[1:]]

    callback = HypersphericalUniformity()
    got, expected = train_both(
        vit,
        image_loss,
        image_data(),
        mhe_penalty(reference_hidden, lambda n: [n.classifier.weight]),
        callback,
        tmp_path,
    )
    assert_same_weights(got, expected, atol=1e-5)


def test_convnext_leaves_depthwise_convs_out_unless_named():
    engine = bound(convnext())
    depthwise = [s.layer for s in engine.selection.skipped if s.reason.startswith("depthwise")]
    assert depthwise == ["convnext.encoder.stages.0.layers.0.dwconv", "convnext.encoder.stages.1.layers.0.dwconv"]
    assert not any("dwconv" in n for n in names(engine))
    named = PenaltyEngine([Rule("mhe", layers=["convnext.encoder.stages.0.layers.0.dwconv"])])
    named.bind(convnext())
    assert named.bindings[0].view.shape() == (8, 49)  # 8 filters of 7x7, each on its own channel


def test_convnext_trains_like_the_preset_written_by_hand(tmp_path):
    engine = bound(convnext())
    hidden = names(engine, "mhe_hidden")

    def reference_hidden(net):
        return [w.reshape(w.shape[0], -1) for w in modules_of(net, hidden)]

    callback = HypersphericalUniformity()
    reference = mhe_penalty(reference_hidden, lambda n: [n.classifier.weight])
    got, expected = train_both(convnext, image_loss, image_data(), reference, callback, tmp_path)
    assert_same_weights(got, expected, atol=1e-5)


# -- timm's fused qkv (timm itself needs torchvision, which cannot be installed next to CPU torch here) --
class TimmStyleAttention(nn.Module):
    """timm's `vision_transformer.Attention` as it computes q, k, v from one `qkv` Linear."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # q, k, v: [b, heads, n, head_dim]

    def forward(self, x):
        q, k, v = self.split(x)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


def test_timm_style_qkv_is_split_in_timm_order_and_per_head():
    attn = TimmStyleAttention(E, 4)
    engine = PenaltyEngine([Rule("mhe", per_head=True, layers=["attn.qkv"])])
    engine.bind(nn.ModuleDict({"attn": attn}))
    assert [b.layer_name for b in engine.bindings][:5] == [
        "attn.qkv.q.head0",
        "attn.qkv.q.head1",
        "attn.qkv.q.head2",
        "attn.qkv.q.head3",
        "attn.qkv.k.head0",
    ]
    x = torch.randn(1, 3, E)
    with torch.no_grad():
        q, k, v = attn.split(x)
        bias_q, bias_k, bias_v = (p.reshape(4, 8) for p in attn.qkv.bias.chunk(3))
    views = {b.layer_name: b.view for b in engine.bindings}
    for label, y, bias in (("q", q, bias_q), ("k", k, bias_k), ("v", v, bias_v)):
        for head in range(4):
            neurons = views[f"attn.qkv.{label}.head{head}"].neurons().detach()
            torch.testing.assert_close(y[0, head], x[0] @ neurons.t() + bias[head], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [Encoder, lambda: gpt2(vocab=64)], ids=["nn.Transformer", "gpt2"])
def test_tied_penalties_cover_every_selected_layer(make):
    """Under a sharded strategy each penalty is computed in its layer's forward: the attention's
    out_proj and the Q/K/V parts in the attention's, the rest in their own."""
    model = make()
    engine = PenaltyEngine(preset_rules("mhe"))
    engine.tie_to_output = True
    engine.bind(model)
    engine.install_hooks()
    engine.begin_step(0)
    if isinstance(model, Encoder):
        out = model(torch.randn(2, 5, E)).sum()
    else:
        out = model(input_ids=torch.randint(0, 64, (2, 6))).logits.sum()
    total = engine.collect()
    engine.end_step()
    assert set(engine.last_values) == {b.key for b in engine.bindings}
    direct = PenaltyEngine(preset_rules("mhe"))
    direct.bind(model)
    expected = direct.direct_penalty(0)
    torch.testing.assert_close(total.detach(), expected.detach())
    (out + total).backward()


def test_monitor_profiles_gpt2_neurons_on_the_output_axis(tmp_path):
    """The monitor finds layers as the rules do: GPT-2's fused c_attn as q, k, v of Conv1D columns."""
    import csv

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from models import trainer_kwargs
    from real_models import Task

    from lightning_hsu import NeuronDiversityMonitor

    torch.manual_seed(0)
    net = gpt2(vocab=64)
    monitor = NeuronDiversityMonitor(layers=["net.transformer.h.0.attn.c_attn.*"], metrics=["min_angle"])
    kw = trainer_kwargs(tmp_path, max_steps=1, callbacks=[monitor], logger=CSVLogger(tmp_path, name="m"))
    trainer = pl.Trainer(**kw)
    trainer.fit(Task(net, lm_loss, lm_data(64)))
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.endswith("min_angle") and v}
    fused = net.transformer.h[0].attn.c_attn.weight.detach()
    for i, part in enumerate("qkv"):
        neurons = fused[:, i * E : (i + 1) * E].t()  # columns of the [in, out] matrix
        unit = torch.nn.functional.normalize(neurons.double(), dim=1)
        cos = (unit @ unit.t()).clamp(-1, 1)
        angles = torch.rad2deg(torch.arccos(cos[torch.triu_indices(E, E, 1).unbind()]))
        got = logged[f"hsu/diversity/net.transformer.h.0.attn.c_attn.{part}/min_angle"]
        assert got == pytest.approx(float(angles.min()), abs=1e-3)
