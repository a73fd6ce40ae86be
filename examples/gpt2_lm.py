"""A small GPT-2 language model trained with and without hyperspherical energy on its layers.

A `transformers.GPT2LMHeadModel` built from a `GPT2Config` (random initialisation, nothing is
downloaded), wrapped in a plain `LightningModule`, learns a byte-level model (vocabulary of the
256 byte values) of text that ships with this repository: `LICENSE`, `README.md` and
`docs/*.md` (`--corpus stdlib` uses some of Python's own standard-library sources instead). The
last 10 % of every file is held out for validation. It is trained twice with the same seed, once
as it is and once with `HypersphericalUniformity(preset="mhe")` added to the trainer's callbacks.
The module knows nothing about the regulariser.

The script prints which layers the callback regularised (from `callback.engine.bindings`), then
two Markdown tables: validation loss, bits per byte and perplexity of both runs with the penalty
of the last training step; and, per regularised layer, the smallest angle between two of its
neurons at the end of training in both runs, logged by `NeuronDiversityMonitor`.

GPT-2's projections are `transformers.pytorch_utils.Conv1D` modules, whose weight is stored
`[in, out]` (the transpose of `nn.Linear`), and `c_attn` fuses the query, key and value
projections in one weight. Which of these layers a preset picks, and what it takes as their
neurons, is the library's business: the example takes whatever the callback chose and prints it.

    python examples/gpt2_lm.py            # a few minutes on a 2-core CPU
    python examples/gpt2_lm.py --smoke    # seconds: what the tests run

Needs `transformers` (`pip install transformers`) on top of the examples' requirements.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from study import last_logged
from torch.utils.data import DataLoader, TensorDataset

from lightning_hsu import HypersphericalUniformity
from lightning_hsu.callbacks import NeuronDiversityMonitor

REPO = Path(__file__).resolve().parents[1]
#: Pure-Python standard-library modules used by `--corpus stdlib` (present in every CPython).
STDLIB_MODULES = ("argparse.py", "textwrap.py", "dataclasses.py", "fractions.py", "statistics.py", "calendar.py")
#: Fraction of every file held out (its end) for validation.
VALIDATION_FRACTION = 0.1


def corpus_files(corpus: str) -> list[Path]:
    """The text files of a corpus: `"docs"` (this repository's licence, README and docs) or
    `"stdlib"` (a few of Python's standard-library sources, found through `sysconfig`)."""
    if corpus == "docs":
        files = [REPO / "LICENSE", REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    elif corpus == "stdlib":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = [stdlib / name for name in STDLIB_MODULES]
    else:
        raise ValueError(f"unknown corpus {corpus!r}; choose 'docs' or 'stdlib'")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"corpus {corpus!r}: missing file(s) {missing}")
    return files


def byte_splits(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(train, validation)` byte streams as int64 tensors: the first 90 % of every file goes to
    training, the rest to validation, so both cover every file."""
    train, val = bytearray(), bytearray()
    for path in files:
        data = path.read_bytes()
        cut = int(len(data) * (1 - VALIDATION_FRACTION))
        train += data[:cut] + b"\n\n"
        val += data[cut:] + b"\n\n"
    return torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(val, dtype=torch.uint8).long()


def windows(stream: torch.Tensor, block: int, stride: int) -> TensorDataset:
    """Sequences of `block` bytes starting every `stride` bytes (the model predicts each next byte)."""
    starts = torch.arange(0, len(stream) - block + 1, stride)
    return TensorDataset(torch.stack([stream[s : s + block] for s in starts.tolist()]))


class GPT2LM(pl.LightningModule):
    """`GPT2LMHeadModel` (random init) as a LightningModule: next-byte cross-entropy, AdamW with a
    linear warm-up and cosine decay over `max_steps`."""

    def __init__(
        self,
        n_layer: int = 4,
        n_embd: int = 128,
        n_head: int = 4,
        block_size: int = 128,
        vocab_size: int = 256,
        lr: float = 2e-3,
        max_steps: int = 400,
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.save_hyperparameters()
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=block_size,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            bos_token_id=None,  # GPT-2's 50256 lies outside a byte vocabulary; no special tokens here
            eos_token_id=None,
        )
        self.model = GPT2LMHeadModel(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def _loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss  # labels are shifted inside the model

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), batch_size=batch[0].shape[0])

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        total = self.hparams.max_steps
        warmup = max(1, total // 20)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def quiet() -> None:
    """Keep the example's own output readable: no Lightning banners or advice about this tiny
    set-up, no transformers notices. Real errors and the library's warnings still show."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=pattern)
    # validation runs once, after training (trainer.validate), not inside fit
    warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # reported where the model is built
        pass


def train(regularised: bool, args: argparse.Namespace, data: tuple[TensorDataset, TensorDataset]) -> dict:
    """One run; returns its validation loss, penalty, regularised layers and logged min angles."""
    pl.seed_everything(args.seed, verbose=False)
    train_set, val_set = data
    name = args.preset if regularised else "baseline"
    print(f"training {name} for {args.steps} steps...", flush=True)
    model = GPT2LM(
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=args.heads,
        block_size=args.block,
        lr=args.lr,
        max_steps=args.steps,
    )
    train_loader = DataLoader(
        train_set, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    val_loader = DataLoader(val_set, batch_size=args.batch)
    logger = CSVLogger(args.root, name=name, version=0)
    hsu = HypersphericalUniformity(preset=args.preset) if regularised else None
    # The monitor only reads the weights: it logs hsu/diversity/<layer>/min_angle for every Linear/Conv*
    # layer at the end of training, with or without the regulariser; in full space for every layer
    # (half_space=False), so that the baseline and the regularised run are measured alike.
    monitor = NeuronDiversityMonitor(
        metrics=["min_angle"],
        every_n_steps=args.steps,
        log_at_epoch_end=False,
        log_at_train_start=False,
        log_histograms=False,
        log_figures=False,
        half_space=False,
    )
    trainer = pl.Trainer(
        max_steps=args.steps,
        max_epochs=-1,
        logger=logger,
        callbacks=[monitor] if hsu is None else [hsu, monitor],
        log_every_n_steps=min(10, args.steps),
        limit_val_batches=args.val_batches,
        val_check_interval=None,
        check_val_every_n_epoch=None,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train_loader)
    # Read the penalty before validating: trainer.validate replaces callback_metrics.
    penalty = float(trainer.callback_metrics.get("hsu/penalty", math.nan))
    (result,) = trainer.validate(model, val_loader, verbose=False)
    bindings = [] if hsu is None else [(b.layer_name, b.rule.label) for b in hsu.engine.bindings]
    logged = last_logged(Path(logger.log_dir) / "metrics.csv")
    prefix = "hsu/diversity/"
    angles = {
        key[len(prefix) : -len("/min_angle")]: v
        for key, v in logged.items()
        if key.startswith(prefix) and key.endswith("/min_angle")
    }
    return {"val_loss": result["val_loss"], "penalty": penalty, "bindings": bindings, "angles": angles}


def fmt(value: float, spec: str = ".1f") -> str:
    return "–" if value is None or math.isnan(value) else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=("docs", "stdlib"), default="docs", help="the text to model")
    parser.add_argument("--preset", default="mhe", help="preset of HypersphericalUniformity (mhe, mhs, mgd, ...)")
    parser.add_argument("--steps", type=int, default=400, help="training steps of each run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128, help="context length in bytes")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--embd", type=int, default=128, help="width (n_embd)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-batches", type=int, default=None, help="validation batches (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("runs/gpt2_lm"), help="where the CSV logs go")
    parser.add_argument("--smoke", action="store_true", help="a tiny model for 12 steps (for tests)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch, args.block, args.layers, args.embd, args.heads = 12, 8, 64, 2, 64, 2
        args.val_batches = 4 if args.val_batches is None else args.val_batches
    quiet()

    files = corpus_files(args.corpus)
    train_stream, val_stream = byte_splits(files)
    # training windows overlap by half a block; validation windows do not overlap
    data = (windows(train_stream, args.block, args.block // 2), windows(val_stream, args.block, args.block))
    print(
        f"corpus {args.corpus!r}: {len(files)} files, {len(train_stream):,} training and {len(val_stream):,} "
        f"validation bytes"
    )

    start = time.perf_counter()
    runs = {"baseline": train(False, args, data), f"{args.preset.upper()} preset": train(True, args, data)}
    elapsed = time.perf_counter() - start
    regularised = runs[f"{args.preset.upper()} preset"]

    print(f"\nlayers regularised by HypersphericalUniformity(preset={args.preset!r}) (callback.engine.bindings):")
    for layer, rule in regularised["bindings"]:
        print(f"  {layer}: {rule}")

    print(
        f"\nGPT-2 ({args.layers} layers, n_embd {args.embd}, {args.heads} heads, context {args.block}), byte-level, "
        f"{args.steps} steps of {args.batch}, seed {args.seed}, {elapsed:.0f} s"
    )
    print("| run | val loss | bits/byte | perplexity | penalty |")
    print("|---|---|---|---|---|")
    for label, r in runs.items():
        loss = r["val_loss"]
        print(
            f"| {label} | {loss:.4f} | {loss / math.log(2):.3f} | {math.exp(loss):.3f} | {fmt(r['penalty'], '.4f')} |"
        )

    print("\n| layer | rule | min∠ baseline (°) | min∠ regularised (°) |")
    print("|---|---|---|---|")
    for layer, rule in regularised["bindings"]:
        base, reg = runs["baseline"]["angles"].get(layer, math.nan), regularised["angles"].get(layer, math.nan)
        print(f"| {layer} | {rule} | {fmt(base)} | {fmt(reg)} |")
    print(
        "\nval loss = mean next-byte cross-entropy (nats) on the held-out 10 % of every file; "
        "perplexity = exp(val loss);"
        "\npenalty = Σ λ·R over the regularised layers at the last training step (hsu/penalty);"
        "\nmin∠ = smallest angle between two neurons of the layer (full space) after training, logged by "
        "NeuronDiversityMonitor\n(– where the monitor logged no such layer)."
        f"\nCSV logs: {args.root}/baseline/version_0, {args.root}/{args.preset}/version_0"
    )


if __name__ == "__main__":
    main()
