"""The monitor and the report on huge layers, tied tensors and many layers: before and after.

Three measurements, each printed as a markdown table, "before" being the exact-always setting
(`max_neurons=None`) or the figure style of the old monitor, run in the same process:

1. **Monitor, 50,000 x 512 layer.** A tiny LightningModule (`Linear(64, 512)` then a
   `Linear(512, 50000)` classifier) trains one epoch with a `NeuronDiversityMonitor` logging at
   epoch end, without monitor, with `max_neurons=None` (exact, what the monitor did before) and
   with the default (`max_neurons=4096`). Reported: the logging event (the monitor's work, timed
   around its `_log`) and the whole `fit` of one epoch; then the big layer's logged metrics, exact
   against sampled.
2. **Report, GPT-2.** A `transformers` GPT-2 of vocabulary 50,257 (`n_embd` 128, 2 layers; random
   init, nothing downloaded) saved with `torch.save(model.state_dict())`; its `lm_head.weight`
   is `transformer.wte.weight`. "before": the old report, every layer exact and the tied tensor
   profiled twice (`report_layers(layer_neurons(...), max_neurons=None)`); "exact, tied once":
   `python -m lightning_hsu.report ckpt --max-neurons none`; "after": the command's defaults.
3. **Figure, 53 layers.** The monitor's figure for 53 layers through a real `TensorBoardLogger`
   (`add_figure` renders it): one panel per layer (the old figure, `figure_style="panels"`) against
   the default for that many layers (`"auto"`: one heatmap). Median of `--repeats` events.

Usage: `python benchmarks/bench_monitor_scale.py [--skip-exact] [--threads N] [--repeats 3]`
(`--skip-exact` leaves out the two exact runs of minutes each).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import torch
from _common import machine, table
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import nn

from lightning_hsu.callbacks import NeuronDiversityMonitor
from lightning_hsu.functional.diversity import DEFAULT_MAX_NEURONS
from lightning_hsu.report import layer_neurons, load_state_dict, main, report_layers

N_CLASSES = 50_000
WIDTH = 512


class MemoryLogger(Logger):
    """Keeps the last value of every logged metric."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)


class TimedMonitor(NeuronDiversityMonitor):
    """Records the wall time of each logging event."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.event_seconds: list[tuple[float, float]] = []  # (wall, process CPU)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hook: Any) -> None:
        cpu, start = time.process_time(), time.perf_counter()
        super()._log(trainer, pl_module, hook)
        self.event_seconds.append((time.perf_counter() - start, time.process_time() - cpu))


class WideClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, WIDTH)
        self.head = nn.Linear(WIDTH, N_CLASSES)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(torch.relu(self.body(x))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def wide_loader(batches: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 * batches, 64, generator=g)
    y = torch.randint(0, N_CLASSES, (64 * batches,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)


def monitor_run(
    root: Path, max_neurons: int | str | None, batches: int
) -> tuple[tuple[float, float], tuple[float, float], dict[str, float]]:
    """One epoch; returns (fit seconds, event seconds, the head's logged metrics), seconds as
    (wall, process CPU)."""
    pl.seed_everything(0, verbose=False)
    model = WideClassifier()
    logger = MemoryLogger()
    callbacks: list[pl.Callback] = []
    monitor = None
    if max_neurons != "off":
        monitor = TimedMonitor(max_neurons=max_neurons)  # type: ignore[arg-type]
        callbacks.append(monitor)
    trainer = pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    cpu, start = time.process_time(), time.perf_counter()
    trainer.fit(model, wide_loader(batches))
    fit_seconds = (time.perf_counter() - start, time.process_time() - cpu)
    events = monitor.event_seconds if monitor is not None else []
    event = (sum(e[0] for e in events), sum(e[1] for e in events))
    head = {k.split("/")[-1]: v for k, v in logger.metrics.items() if k.startswith("hsu/diversity/head/")}
    return fit_seconds, event, head


def bench_monitor(args: argparse.Namespace, root: Path) -> None:
    settings: list[tuple[str, int | str | None]] = [("no monitor", "off")]
    if not args.skip_exact:
        settings.append(("before: max_neurons=None (exact)", None))
    settings.append((f"after: max_neurons={DEFAULT_MAX_NEURONS} (default)", DEFAULT_MAX_NEURONS))
    rows, logged = [], {}
    for label, setting in settings:
        fit_s, event_s, head = monitor_run(root, setting, args.batches)
        rows.append([label, event_s[0], event_s[1], fit_s[0], fit_s[1]])
        logged[label] = head
    print(f"\n### Monitor: `Linear({WIDTH}, {N_CLASSES})` classifier, one epoch of {args.batches} batches of 64\n")
    header = ["monitor", "logging event: wall s", "CPU s", "fit, 1 epoch: wall s", "CPU s"]
    print(table(header, rows))
    if len(logged) == 3:
        exact, sampled = list(logged.values())[1:]
        keys = [k for k in exact if k in sampled] + [k for k in sampled if k not in exact]
        print("\nThe classifier's logged metrics (the same weights):\n")
        print(table(["metric", "exact", "sampled"], [[k, exact.get(k, "–"), sampled.get(k, "–")] for k in keys]))


def bench_report(args: argparse.Namespace, root: Path) -> None:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=50257, n_embd=128, n_layer=2, n_head=2, n_positions=1024, bos_token_id=50256, eos_token_id=50256
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    path = root / "gpt2.pt"
    torch.save(model.state_dict(), path)
    rows = []

    def timed(label: str, run: Any) -> None:
        cpu, start = time.process_time(), time.perf_counter()
        result = run()
        rows.append([label, time.perf_counter() - start, time.process_time() - cpu, result])

    def old_report() -> int:
        return len(report_layers(layer_neurons(load_state_dict(path)), max_neurons=None))

    def cli(*extra: str) -> int:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([str(path), *extra]) == 0
        return sum(1 for line in out.getvalue().splitlines() if line.startswith("| ")) - 1

    if not args.skip_exact:
        timed("before: exact, tied tensor twice", old_report)
        timed("exact, tied tensor once (`--max-neurons none`)", lambda: cli("--max-neurons", "none"))
    timed(f"after: defaults (`--max-neurons {DEFAULT_MAX_NEURONS}`)", cli)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(path)])
    print("\n### Report: GPT-2 (vocabulary 50,257, n_embd 128, 2 layers), `torch.save(model.state_dict())`\n")
    print(table(["report", "wall s", "CPU s", "rows"], rows))
    print("\nThe command's table (defaults):\n")
    print(out.getvalue().strip())


def bench_figure(args: argparse.Namespace, root: Path) -> None:
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(53)])
    tb = TensorBoardLogger(root, name="figures", version=0)
    trainer = SimpleNamespace(
        global_step=0,
        current_epoch=0,
        is_global_zero=True,
        loggers=[tb],
        strategy=SimpleNamespace(model=model, broadcast=lambda obj, src=0: obj),
    )
    rows = []
    for label, style in (("before: one panel per layer", "panels"), ("after: default (`auto`: heatmap)", "auto")):
        monitor = NeuronDiversityMonitor(figure_style=style)  # type: ignore[arg-type]
        monitor._selected = monitor._resolve(model)
        profile_times: list[float] = []
        figure_times: list[tuple[float, float]] = []
        draw = monitor._write_figure

        def timed_draw(*a: Any, _times: list[tuple[float, float]] = figure_times, _draw: Any = draw) -> None:
            cpu, start = time.process_time(), time.perf_counter()
            _draw(*a)
            _times.append((time.perf_counter() - start, time.process_time() - cpu))

        monitor._write_figure = timed_draw  # type: ignore[method-assign]
        for step in range(args.repeats):
            trainer.global_step = step + 1
            start = time.perf_counter()
            monitor._profile_and_write(trainer, model, trainer.global_step)  # type: ignore[arg-type]
            profile_times.append(time.perf_counter() - start)
        event = statistics.median(profile_times)
        figure_wall = statistics.median(t[0] for t in figure_times)
        figure_cpu = statistics.median(t[1] for t in figure_times)
        rows.append([label, figure_wall, figure_cpu, event])
    tb.experiment.close()
    print(f"\n### Figure: 53 `Linear(64, 64)` layers to TensorBoard, median of {args.repeats} events\n")
    print(table(["figure", "figure: wall s", "CPU s", "whole event: wall s"], rows))


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-exact", action="store_true", help="leave out the exact runs (minutes each)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--batches", type=int, default=20, help="batches of 64 in the monitor's epoch")
    parser.add_argument("--repeats", type=int, default=3, help="events per figure style")
    parser.add_argument("--only", choices=["monitor", "report", "figure"], nargs="+", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(f"Machine: {machine()}")
    print(f"Command: python benchmarks/bench_monitor_scale.py {' '.join(sys.argv[1:])}".rstrip())
    parts = args.only or ["figure", "report", "monitor"]
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            {"monitor": bench_monitor, "report": bench_report, "figure": bench_figure}[part](args, Path(tmp))
            sys.stdout.flush()


if __name__ == "__main__":
    main_cli()
