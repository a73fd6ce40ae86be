"""Step-time overhead of `HypersphericalUniformity` on real architectures and light models (CPU).

Models are built from `transformers` configs with random initialisation (nothing is downloaded),
plus PyTorch's own `nn.TransformerEncoder`:

| key | model | input, batch |
|---|---|---|
| `gpt2` | `GPT2LMHeadModel`, 4 layers, n_embd 256, 4 heads, vocabulary 1024 | 128 tokens, 8 |
| `bert` | `BertForSequenceClassification`, 4 layers, hidden 256, 4 heads, vocabulary 1024 | 128 tokens, 8 |
| `vit` | `ViTForImageClassification`, 4 layers, hidden 192, 3 heads, patch 4 | 32 px, 32 |
| `convnext` | `ConvNextForImageClassification`, depths 2-2-2-2, widths 48-384, patch 2 | 32 px, 32 |
| `mobilenetv2` | `MobileNetV2ForImageClassification` (width 1.0), a light model | 32 px, 32 |
| `resnet18` | `ResNetForImageClassification`, ResNet-18 depths (basic blocks 2-2-2-2), a light model | 32 px, 32 |
| `transformer` | `nn.TransformerEncoder`, 4 layers, d_model 256, 4 heads (+ embedding, linear head) | 128 tokens, 8 |

The regularised layers are whatever `HypersphericalUniformity(preset=...)` selects in each model
(the public API, nothing else): the table gives their number, `len(callback.engine.bindings)`,
and how many of them got a penalty in a step (`len(callback.engine.last_values)`, the most over
the timed steps; it is lower when a selected layer's forward never runs, e.g. the `out_proj` of
`nn.MultiheadAttention`, whose weight is used without calling the module).

Method (as `bench_training_step.py`, see `_common.py`): for each model and setting, one
`Trainer.fit` on random data in which the callback's `enabled` flag takes turns, in blocks of
`--block` consecutive steps (default 4): "off" (the callback installed but switched off: the
baseline) and "on". Blocks come in rounds of one "off" and one "on" block, their order alternating
from round to round; the first round is a warm-up and is dropped. A step is timed from
`on_train_batch_start` to `on_train_batch_end` (forward, backward, optimizer step). Reported: the
median step time of each mode, and the median over rounds of the paired ratio (the "on" block
against the "off" block of the same round, adjacent in time) with a 95% bootstrap interval, which
a slow spell of a shared machine disturbs less than the ratio of two medians.

Lazy regularisation: for the light models each preset is also run with
`HypersphericalUniformity(preset=..., every_n_steps=k)` (`--every`, default 4), which applies the
penalty on every k-th global step only, with k times the coefficient. A block of k consecutive steps
holds exactly one penalised step, so the block ratio is the amortised cost per step.

A setting that fails (the callback refusing a model, say) gets a row with the error; the other
rows still run. Compare ratios taken in one run, never absolute times across runs or machines.

Usage:

    python benchmarks/bench_real_models.py                       # all models, preset mhe, 10 rounds
    python benchmarks/bench_real_models.py --quick               # 3 rounds: a first look in minutes
    python benchmarks/bench_real_models.py --presets mhe,mgd,comhe --threads 1 --rounds 20
    python benchmarks/bench_real_models.py --models resnet18,mobilenetv2 --every 2
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import (
    add_common_args,
    apply_threads,
    device_arg,
    machine,
    ms,
    names_of,
    paired_ratio,
    quiet_fit,
    sync,
    table,
)
from torch import nn

from lightning_hsu.rules import PRESETS

#: Vocabulary of the token models (a real one would make the tied output layer dominate).
VOCAB = 1024
SEQ_LEN = 128
TOKEN_BATCH = 8
IMAGE_SIZE = 32
IMAGE_BATCH = 32
CLASSES = 10


@dataclass
class ModelSpec:
    """How to build one benchmarked model and its batches."""

    key: str
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    optimizer: str = "adamw"
    light: bool = False
    batch_size: int = TOKEN_BATCH


def _tokens(generator: torch.Generator, labels: str) -> dict[str, torch.Tensor]:
    """A batch of random token ids; `labels="ids"`: the ids themselves (a language model), else two classes."""
    ids = torch.randint(0, VOCAB, (TOKEN_BATCH, SEQ_LEN), generator=generator)
    if labels == "ids":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 2, (TOKEN_BATCH,), generator=generator)}


def _images(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.randn(IMAGE_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "labels": torch.randint(0, CLASSES, (IMAGE_BATCH,), generator=generator),
    }


def _hf_loss(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return net(**batch).loss


class EncoderClassifier(nn.Module):
    """Token embedding → `nn.TransformerEncoder` → mean over tokens → linear head (2 classes)."""

    def __init__(self, d_model: int = 256, heads: int = 4, layers: int = 4, ff: int = 1024) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids)).mean(dim=1))


def _encoder_loss(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(net(batch["input_ids"]), batch["labels"])


def model_specs() -> dict[str, ModelSpec]:
    """Every benchmarked model by key (the `transformers` ones are imported when built)."""

    def gpt2() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
        )
        return GPT2LMHeadModel(config)

    def bert() -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=SEQ_LEN,
            num_labels=2,
        )
        return BertForSequenceClassification(config)

    def vit() -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=IMAGE_SIZE,
            patch_size=4,
            hidden_size=192,
            num_hidden_layers=4,
            num_attention_heads=3,
            intermediate_size=768,
            num_labels=CLASSES,
        )
        return ViTForImageClassification(config)

    def convnext() -> nn.Module:
        from transformers import ConvNextConfig, ConvNextForImageClassification

        config = ConvNextConfig(
            image_size=IMAGE_SIZE, patch_size=2, depths=[2, 2, 2, 2], hidden_sizes=[48, 96, 192, 384], num_labels=10
        )
        return ConvNextForImageClassification(config)

    def mobilenetv2() -> nn.Module:
        from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

        return MobileNetV2ForImageClassification(MobileNetV2Config(image_size=IMAGE_SIZE, num_labels=CLASSES))

    def resnet18() -> nn.Module:
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(
            layer_type="basic",
            depths=[2, 2, 2, 2],
            hidden_sizes=[64, 128, 256, 512],
            embedding_size=64,
            num_labels=CLASSES,
        )
        return ResNetForImageClassification(config)

    specs = [
        ModelSpec("gpt2", "GPT-2 (4 × 256)", gpt2, lambda g: _tokens(g, "ids"), _hf_loss),
        ModelSpec("bert", "BERT (4 × 256)", bert, lambda g: _tokens(g, "2"), _hf_loss),
        ModelSpec("vit", "ViT (4 × 192, patch 4)", vit, _images, _hf_loss, batch_size=IMAGE_BATCH),
        ModelSpec("convnext", "ConvNeXt (2-2-2-2, 48-384)", convnext, _images, _hf_loss, batch_size=IMAGE_BATCH),
        ModelSpec(
            "mobilenetv2", "MobileNetV2", mobilenetv2, _images, _hf_loss, "sgd", light=True, batch_size=IMAGE_BATCH
        ),
        ModelSpec("resnet18", "ResNet-18", resnet18, _images, _hf_loss, "sgd", light=True, batch_size=IMAGE_BATCH),
        ModelSpec(
            "transformer",
            "nn.TransformerEncoder (4 × 256)",
            EncoderClassifier,
            lambda g: _tokens(g, "2"),
            _encoder_loss,
        ),
    ]
    return {s.key: s for s in specs}


def lightning_module(spec: ModelSpec) -> Any:
    """The model of `spec` in a plain LightningModule (AdamW for the transformers, SGD for the CNNs)."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = spec.build()

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return spec.loss(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if spec.optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    return Module()


class Batches(torch.utils.data.Dataset):
    """`length` batches cycling through a few fixed random ones (no data-loading cost in the step)."""

    def __init__(self, spec: ModelSpec, length: int, distinct: int = 4) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batches = [spec.batch(generator) for _ in range(distinct)]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index % len(self.batches)]


@dataclass
class Measurement:
    """Block times of one fit: `off[i]` and `on[i]` were taken in the same round."""

    off: list[float] = field(default_factory=list)
    on: list[float] = field(default_factory=list)
    bindings: int = 0
    penalised: int = 0


def measure(
    spec: ModelSpec, preset: str, every_n_steps: int, rounds: int, block: int, device: torch.device
) -> Measurement:
    """One `Trainer.fit` of `spec` with `HypersphericalUniformity(preset, every_n_steps)` switched
    off and on in alternating blocks of `block` steps; `rounds` timed rounds after one warm-up."""
    import lightning.pytorch as pl

    from lightning_hsu import HypersphericalUniformity

    hsu = HypersphericalUniformity(preset=preset, every_n_steps=every_n_steps)
    result = Measurement()
    per_round: dict[tuple[int, str], float] = {}
    current: dict[str, Any] = {}

    class Rotate(pl.Callback):
        """Switches the callback per block and times every step."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            index = batch_idx // block
            round_, position = divmod(index, 2)
            mode = ("off", "on")[(position + round_) % 2]  # the order alternates from round to round
            current.update(round=round_, mode=mode)
            hsu.enabled = mode == "on"
            sync(device)
            current["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            elapsed = time.perf_counter() - current["t0"]
            if current["mode"] == "on":  # read defensively: the engine's internals may change
                result.penalised = max(result.penalised, len(getattr(hsu.engine, "last_values", None) or {}))
            if current["round"] == 0:
                return  # warm-up
            key = (current["round"], current["mode"])
            per_round[key] = per_round.get(key, 0.0) + elapsed

    torch.manual_seed(0)
    module = lightning_module(spec)
    batches = (rounds + 1) * 2 * block
    loader = torch.utils.data.DataLoader(Batches(spec, batches), batch_size=None)
    quiet_fit(module, loader, [Rotate(), hsu], device)
    result.bindings = len(getattr(hsu.engine, "bindings", None) or [])
    for r in range(1, rounds + 1):
        result.off.append(per_round[(r, "off")])
        result.on.append(per_round[(r, "on")])
    return result


def row(spec: ModelSpec, setting: str, m: Measurement, params: float, block: int) -> list[object]:
    """One table row; step times are a block's mean step, median over rounds (with every_n_steps=k
    a block holds one penalised step and k - 1 others, so this is the amortised step)."""
    median, low, high = paired_ratio(m.on, m.off)
    return [
        spec.description,
        spec.batch_size,
        f"{params:.1f}",
        setting,
        m.bindings,
        m.penalised,
        ms(statistics.median(m.off) / block),
        ms(statistics.median(m.on) / block),
        f"{100 * (median - 1):+.1f}% [{100 * (low - 1):+.1f}, {100 * (high - 1):+.1f}]",
    ]


HEADER = [
    "model",
    "batch",
    "params (M)",
    "setting",
    "regularised layers",
    "penalised per step",
    "step ms, off",
    "step ms, on",
    "on vs off, paired [95%]",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    specs = model_specs()
    parser.add_argument("--models", default=",".join(specs), help=f"comma-separated subset of {list(specs)}")
    parser.add_argument("--presets", default="mhe", help="comma-separated presets (mhe, mgd, comhe, mhs, ...)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (one 'off' and one 'on' block each)")
    parser.add_argument("--block", type=int, default=4, help="consecutive steps per block (a multiple of --every)")
    parser.add_argument("--every", type=int, default=4, help="every_n_steps of the light models' extra rows (0: none)")
    parser.add_argument("--quick", action="store_true", help="3 rounds (a first look; intervals are wide)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3
    if args.every and args.block % args.every:
        parser.error(f"--block {args.block} must be a multiple of --every {args.every}")
    apply_threads(args.threads)
    device = device_arg(args.device)
    keys = names_of(parser, "--models", args.models, specs)
    presets = names_of(parser, "--presets", args.presets, PRESETS)

    try:
        import transformers

        transformers.logging.set_verbosity_error()
        hf = f", transformers {transformers.__version__}"
    except ImportError:
        hf = ", transformers not installed (only `transformer` runs)"
        keys = [k for k in keys if k == "transformer"]
    import lightning

    for name in ("lightning.pytorch", "lightning.fabric"):  # no start-up banners (after the import sets them)
        logging.getLogger(name).setLevel(logging.WARNING)
    print(f"Command: python {shlex.join(sys.argv)}")
    print(f"Machine: {machine()}, lightning {lightning.__version__}{hf}")
    print(f"Started {time.strftime('%Y-%m-%d %H:%M')}; {args.rounds} timed rounds of 2 blocks × {args.block} steps\n")

    rows: list[list[object]] = []
    notes: list[str] = []
    for key in keys:
        spec = specs[key]
        torch.manual_seed(0)
        params = sum(p.numel() for p in spec.build().parameters()) / 1e6
        settings = [(preset, 1) for preset in presets]
        if spec.light and args.every > 1:
            settings += [(preset, args.every) for preset in presets]
        for preset, every in settings:
            label = f"{preset}" + (f", every_n_steps={every}" if every > 1 else "")
            start = time.perf_counter()
            try:
                m = measure(spec, preset, every, args.rounds, args.block, device)
            except Exception as err:  # one refused model must not stop the others
                message = str(err).splitlines()[0] if str(err) else ""
                rows.append([spec.description, spec.batch_size, f"{params:.1f}", label, "error", "", "", "", ""])
                notes.append(f"{spec.description}, {label}: {type(err).__name__}: {message[:300]}")
                traceback.print_exc(file=sys.stderr)
                continue
            rows.append(row(spec, label, m, params, args.block))
            print(f"  {key}, {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    print(table(HEADER, rows))
    print(
        "\nstep ms: mean step (forward, backward, optimizer) of a block, median over rounds, with the callback "
        "switched off / on, in one Trainer.fit;\non vs off: median over rounds of the 'on' block's time over the "
        "'off' block's of the same round, 95% bootstrap interval;\nregularised layers: len(callback.engine.bindings); "
        "penalised per step: layers that got a penalty in a penalised step."
    )
    for note in notes:
        print(f"\nerror: {note}")


if __name__ == "__main__":
    main()
