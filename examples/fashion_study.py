"""Fashion-MNIST study: the papers' protocol (CNN-9, SGD, augmentation, their coefficients) on a CPU.

Every run trains `CNN9` (`examples/fashion_mnist.py`) with the same optimiser, schedule and
augmentation; only the `HypersphericalUniformity` callback differs. Configurations: the baseline,
MHE (s = 0, 1, 2; hidden layers in full or half space), MHS, MHP, MHC, MGD, R-MHP, CoMHE and the
Wang–Isola uniformity, with the papers' coefficients (hidden / classifier) times one global factor
(`--scale`, 0.1 by default). Regimes: the whole training pool and low-data subsets drawn from it
(a fixed 5,000-image validation split is held out of the 60,000 first). Each run appends one row
to a CSV; a stopped study resumes where it stopped (rows already in the CSV are skipped). The
table (`<name>_table.md`) and plot (`<name>.png`) are regenerated from the CSV.

    python examples/fashion_study.py                   # the CPU study in docs/reproduction_fashion.md
    python examples/fashion_study.py --report-only     # table and plot again from the committed CSV
    python examples/fashion_study.py --overhead        # step times of every configuration, measured apart
    python examples/fashion_study.py --device cuda --width full --workers 4 --name fashion_gpu  # on a GPU
    python examples/fashion_study.py --smoke --out /tmp/f    # seconds: 2 configurations, a few steps

The data come from Debian's `dataset-fashion-mnist` (installed when missing, as root) or a
torchvision download; see `fashion_mnist.load_fashion_mnist`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `fashion_mnist` next to this script, also in workers
from study import CONFIGS, rules_for


@dataclass(frozen=True)
class Regime:
    """A training set and its schedule: `per_class` images of every class (`None`: the whole pool)."""

    per_class: int | None
    epochs: int
    #: configurations run in this regime (`None`: all of CONFIGS)
    configs: tuple[str, ...] | None = None


#: The CPU study. The whole pool (59,000 images) costs 2-8 minutes per epoch and run on a shared
#: core, so it gets 1 epoch; n100 and full run every configuration. n500 costs as much per run as
#: the full regime, so it runs the baseline and the strongest or most telling configurations only
#: (the session's time, not a result, set this list); `--configs` restricts every regime to a list.
REGIMES: dict[str, Regime] = {
    "n100": Regime(per_class=100, epochs=12),
    "full": Regime(per_class=None, epochs=1),
    "n500": Regime(
        per_class=500,
        epochs=12,
        configs=("baseline", "MHE s=2 half", "MHS", "CoMHE", "uniformity", "MHP fast pole"),
    ),
}
DEFAULT_REGIMES = ("n100", "full", "n500")
SMOKE_CONFIGS = ("baseline", "MHE s=2 half", "MHP")
#: CNN-9 widths: the CPU study's and the papers' (GPU).
WIDTHS = {"small": ((16, 32, 64), 128), "full": ((64, 128, 256), 256)}
#: Fixed seeds of the data splits: the validation split and the low-data subsets never change with
#: the run's seed, which sets the initialisation, the batch order and the augmentation.
SPLIT_SEED = 0
VALIDATION_PER_CLASS = 100
BATCH_SIZE = 128
LR = 0.1
CLASSIFIER = "classifier"
FIELDS = (
    "config",
    "regime",
    "seed",
    "train_size",
    "epochs",
    "steps",
    "width",
    "scale",
    "device",
    "val_acc",
    "test_acc",
    "hidden_min_angle",
    "hidden_energy",
    "classifier_min_angle",
    "classifier_energy",
    "fit_seconds",
    "seconds",
)


@dataclass(frozen=True)
class Job:
    config: str
    regime: str
    seed: int
    epochs: int
    per_class: int | None
    scale: float
    width: str
    device: str
    data: str | None  # a directory of idx files (tests); None: the standard places
    smoke: bool


def diversity(model) -> dict[str, float]:
    """Minimum angle (degrees) and MHE s = 2 energy of the trained neurons.

    Hidden layers (the nine convolutions and `fc`) in half space, averaged over the ten; the
    classifier in full space: as the papers regularise them.
    """
    from lightning_hsu.functional import diversity_summary, neurons_of

    hidden = [
        diversity_summary(neurons_of(layer), metrics=["min_angle", "energy"], half_space=True)
        for layer in model.hidden_layers().values()
    ]
    classifier = diversity_summary(neurons_of(model.classifier), metrics=["min_angle", "energy"])
    return {
        "hidden_min_angle": statistics.fmean(s["min_angle"] for s in hidden),
        "hidden_energy": statistics.fmean(s["energy"] for s in hidden),
        "classifier_min_angle": classifier["min_angle"],
        "classifier_energy": classifier["energy"],
    }


_DATA: dict[tuple[str | None, str, bool], Any] = {}  # per worker process: the splits, loaded once


def splits(data_dir: str | None, device: str, smoke: bool) -> dict[str, Any]:
    """`train pool`, `val` and `test` tensors (uint8 images, int64 labels) on `device`, cached per process."""
    key = (data_dir, device, smoke)
    if key not in _DATA:
        from fashion_mnist import load_fashion_mnist, stratified_split

        if data_dir is not None:
            data = load_fashion_mnist([Path(data_dir)], install=False, download=False, check_sizes=False)
        else:
            data = load_fashion_mnist()
        per_class_val = 5 if smoke else VALIDATION_PER_CLASS
        val, pool = stratified_split(data.train_labels, per_class_val, seed=SPLIT_SEED)
        test_images, test_labels = data.test_images, data.test_labels
        if smoke:
            test_images, test_labels = test_images[:200], test_labels[:200]
        _DATA[key] = {
            "pool": (data.train_images[pool].to(device), data.train_labels[pool].to(device)),
            "val": (data.train_images[val].to(device), data.train_labels[val].to(device)),
            "test": (test_images.to(device), test_labels.to(device)),
        }
    return _DATA[key]


def run(job: Job) -> dict[str, Any]:
    """Train one (configuration, regime, seed); return its accuracies, diversity and timings."""
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch
    from fashion_mnist import CNN9, TensorBatches, stratified_split

    from lightning_hsu import HypersphericalUniformity

    warnings.filterwarnings("ignore")  # Lightning's advice about workers and loaders, per run
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)  # runs are parallel across processes; one thread each avoids oversubscription
    start = time.perf_counter()
    data = splits(job.data, job.device, job.smoke)
    images, labels = data["pool"]
    if job.per_class is not None:
        chosen, _ = stratified_split(labels.cpu(), job.per_class, seed=SPLIT_SEED)
        chosen = chosen.to(labels.device)
        images, labels = images[chosen], labels[chosen]
    pl.seed_everything(job.seed, verbose=False)
    batches = TensorBatches(images, labels, BATCH_SIZE, shuffle=True, seed=job.seed)
    steps = job.epochs * len(batches)
    widths, hidden = WIDTHS[job.width]
    model = CNN9(widths=widths, hidden=hidden, lr=LR, max_steps_hint=steps, seed=job.seed)
    rules = rules_for(job.config, job.scale, job.seed)
    callbacks = (
        [HypersphericalUniformity(rules=rules, classifier=CLASSIFIER, log=False, verbose=False)] if rules else []
    )
    trainer = pl.Trainer(
        max_epochs=job.epochs,
        accelerator="gpu" if job.device.startswith("cuda") else "cpu",
        devices=[int(job.device.split(":")[1])] if job.device.startswith("cuda:") else 1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    fit_start = time.perf_counter()
    trainer.fit(model, batches)
    if job.device.startswith("cuda"):
        torch.cuda.synchronize()
    fit_seconds = time.perf_counter() - fit_start
    model = model.to(job.device)
    return {
        "config": job.config,
        "regime": job.regime,
        "seed": job.seed,
        "train_size": len(labels),
        "epochs": job.epochs,
        "steps": steps,
        "width": job.width,
        "scale": job.scale,
        "device": job.device,
        "val_acc": model.accuracy(*data["val"]),
        "test_acc": model.accuracy(*data["test"]),
        **{k: v for k, v in diversity(model.cpu()).items()},
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - start,
    }


def measure_overhead(args: argparse.Namespace, steps: int = 15, warmup: int = 3, rounds: int = 3) -> list[dict]:
    """Seconds per training step of every configuration, measured in one process, interleaved.

    The per-run fit times of the study mix the regulariser's cost with the load of a shared CPU;
    here every round times `steps` steps (after `warmup`) of each configuration in turn on the
    *n100* data, so that a configuration and the baseline see about the same load. A step is
    timed from the first callback's `on_train_batch_start` to the last one's `on_train_batch_end`
    (forward, penalties, backward, optimizer and pole steps). Returns one row per (round, config)
    with the median step time.
    """
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch
    from fashion_mnist import CNN9, TensorBatches, stratified_split

    from lightning_hsu import HypersphericalUniformity

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    data = splits(None if args.data is None else str(args.data), args.device, args.smoke)
    images, labels = data["pool"]
    chosen, _ = stratified_split(labels.cpu(), 20 if args.smoke else 100, seed=SPLIT_SEED)
    images, labels = images[chosen.to(labels.device)], labels[chosen.to(labels.device)]
    widths, hidden = WIDTHS[args.width]
    times: list[float] = []
    mark: dict[str, float] = {}

    class First(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[override]
            mark["start"] = time.perf_counter()

    class Last(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[override]
            if trainer.global_step > warmup:
                times.append(time.perf_counter() - mark["start"])

    configs = list(args.configs or CONFIGS)
    rows = []
    for round_ in range(rounds):
        for config in configs:
            pl.seed_everything(round_, verbose=False)
            model = CNN9(widths=widths, hidden=hidden, lr=LR, max_steps_hint=warmup + steps, seed=round_)
            rules = rules_for(config, args.scale, round_)
            hsu = [HypersphericalUniformity(rules=rules, classifier=CLASSIFIER, log=False, verbose=False)]
            trainer = pl.Trainer(
                max_steps=warmup + steps,
                accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                devices=1,
                logger=False,
                callbacks=[First(), *(hsu if rules else []), Last()],
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
            )
            times.clear()
            trainer.fit(model, TensorBatches(images, labels, BATCH_SIZE, shuffle=True, seed=round_))
            rows.append({"round": round_, "config": config, "seconds_per_step": statistics.median(times)})
            print(f"round {round_} {config:14s} {1000 * rows[-1]['seconds_per_step']:.0f} ms/step", flush=True)
    return rows


def overhead_table(rows: list[dict[str, Any]]) -> str:
    """Median step time per configuration and its ratio to the baseline's in the same round."""
    lines = [
        "Step time, measured apart (`--overhead`): CNN-9 width small, batch 128, one thread; median over "
        f"rounds of each round's median step time ({len({r['round'] for r in rows})} rounds, configurations "
        "interleaved). Overhead: the ratio to the baseline's step time in the same round, median over rounds.",
        "",
        "| configuration | ms per step | overhead |",
        "|---|---|---|",
    ]
    base = {r["round"]: r["seconds_per_step"] for r in rows if r["config"] == "baseline"}
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        if not mine:
            continue
        ms = 1000 * statistics.median(r["seconds_per_step"] for r in mine)
        ratios = [r["seconds_per_step"] / base[r["round"]] - 1 for r in mine if r["round"] in base]
        over = "—" if config == "baseline" or not ratios else f"{100 * statistics.median(ratios):+.0f}%"
        lines.append(f"| {config} | {ms:.0f} | {over} |")
    return "\n".join(lines) + "\n"


# -- the report ---------------------------------------------------------------------------------

NUMERIC = set(FIELDS) - {"config", "regime", "width", "device"}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The runs of a CSV written by this script (numbers parsed), or `[]` when it does not exist."""
    if not path.exists():
        return []
    with path.open() as f:
        return [
            {
                k: (int(v) if k in ("seed", "train_size", "epochs", "steps") else float(v)) if k in NUMERIC else v
                for k, v in r.items()
            }
            for r in csv.DictReader(f)
        ]


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """`(mean(a) − mean(b), low, high)`: Welch's confidence interval (Satterthwaite's degrees of freedom)."""
    from scipy import stats

    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(va + vb)
    return diff, diff - half, diff + half


def paired_interval(pairs: list[tuple[float, float]], level: float = 0.95) -> tuple[float, float, float]:
    """`(mean(a − b), low, high)` over matched pairs: Student's interval of the mean difference."""
    from scipy import stats

    diffs = [a - b for a, b in pairs]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def _interval(d: float, lo: float, hi: float) -> str:
    return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (" *" if lo > 0 or hi < 0 else "")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def regime_table(rows: list[dict[str, Any]], regime: str) -> str:
    """The markdown table of one regime, configurations in the order of `CONFIGS`."""
    mine = [r for r in rows if r["regime"] == regime]
    first = mine[0]
    seeds = sorted({r["seed"] for r in mine})
    base = [r for r in mine if r["config"] == "baseline"]
    base_acc = [r["test_acc"] for r in base]
    epochs = f"{first['epochs']} epoch" + ("" if first["epochs"] == 1 else "s")
    lines = [
        f"**{regime}**: {first['train_size']:,} training images, {epochs} ({first['steps']} steps of "
        f"{BATCH_SIZE}), CNN-9 width {first['width']}, coefficient factor {first['scale']:g}, "
        f"{len(seeds)} seeds per configuration ({len(mine)} runs).",
        "",
        "| configuration | λ hidden / classifier | test acc. (%) | Δ vs baseline [95% CI] | Δ paired [95% CI] "
        "| val. acc. (%) | hidden min∠ (°) | classifier min∠ (°) | hidden energy | classifier energy "
        "| fit time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, (_, _, _, lam_h, lam_c) in CONFIGS.items():
        runs = [r for r in mine if r["config"] == config]
        if not runs:
            continue
        acc = [100 * r["test_acc"] for r in runs]
        base_by_seed = {r["seed"]: 100 * r["test_acc"] for r in base}
        pairs = [(100 * r["test_acc"], base_by_seed[r["seed"]]) for r in runs if r["seed"] in base_by_seed]
        if config == "baseline" or len(base_acc) < 2:
            delta = paired = "—"
        else:
            delta = _interval(*welch_interval(acc, [100 * a for a in base_acc]))
            paired = _interval(*paired_interval(pairs)) if len(pairs) > 1 else "—"
        fit = statistics.fmean(r["fit_seconds"] for r in runs)
        cells = [
            f"{config}" + (f" (n={len(runs)})" if len(runs) != len(seeds) else ""),
            "—" if config == "baseline" else f"{lam_h * runs[0]['scale']:g} / {lam_c * runs[0]['scale']:g}",
            "{:.2f} ± {:.2f}".format(*_mean_sd(acc)),
            delta,
            paired,
            "{:.2f} ± {:.2f}".format(*_mean_sd([100 * r["val_acc"] for r in runs])),
            "{:.1f} ± {:.1f}".format(*_mean_sd([r["hidden_min_angle"] for r in runs])),
            "{:.1f} ± {:.1f}".format(*_mean_sd([r["classifier_min_angle"] for r in runs])),
            f"{statistics.fmean(r['hidden_energy'] for r in runs):.4f}",
            f"{statistics.fmean(r['classifier_energy'] for r in runs):.4f}",
            f"{fit:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def regimes_in(rows: list[dict[str, Any]]) -> list[str]:
    """The regimes present, in the order of `REGIMES` (unknown names last)."""
    present = {r["regime"] for r in rows}
    return [r for r in REGIMES if r in present] + sorted(present - set(REGIMES))


def markdown_report(rows: list[dict[str, Any]]) -> str:
    """One table per regime, with the legend."""
    legend = (
        "Mean ± sample sd over seeds. Δ: test accuracy minus the baseline's, in points, with Welch's 95% "
        "confidence interval (* where it excludes 0). Δ paired: the mean over seeds of (run − baseline run of the "
        "same seed), which shares the initialisation, batch order and augmentation, with Student's 95% interval "
        "(* where it excludes 0). val.: the held-out validation split (not used for any "
        "choice). min∠: smallest angle between two neurons (hidden: between lines, half space, mean over the 10 "
        "hidden layers; classifier: full space). energy: MHE s = 2 energy (hidden: half space, mean over the "
        "layers), lower is more uniform. fit time: mean seconds of `trainer.fit` per run; "
        "they follow the shared CPU's load when the runs happened, not the regulariser (its cost is the step-time "
        "table below, measured apart)."
    )
    return legend + "\n\n" + "\n".join(regime_table(rows, regime) for regime in regimes_in(rows))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Top: test accuracy per configuration (mean ± sd, dots = seeds) per regime. Bottom: accuracy
    against the hidden layers' half-space energy, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = regimes_in(rows)
    fig, axes = plt.subplots(2, len(regimes), figsize=(7 * len(regimes), 10), squeeze=False)
    colors = {c: plt.get_cmap("tab20").colors[i % 20] for i, c in enumerate(c for c in CONFIGS if c != "baseline")}
    colors["baseline"] = (0.0, 0.0, 0.0)
    for j, regime in enumerate(regimes):
        mine = [r for r in rows if r["regime"] == regime]
        names = [c for c in CONFIGS if any(r["config"] == c for r in mine)]
        ax = axes[0][j]
        for i, config in enumerate(names):
            acc = [100 * r["test_acc"] for r in mine if r["config"] == config]
            mean, sd = _mean_sd(acc)
            ax.errorbar(i, mean, yerr=sd, fmt="o", color=colors[config], capsize=4)
            ax.scatter([i] * len(acc), acc, s=10, color=colors[config], alpha=0.4)
        base = [100 * r["test_acc"] for r in mine if r["config"] == "baseline"]
        if base:
            ax.axhline(statistics.fmean(base), color="grey", ls="--", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_xlim(-0.8, max(len(names), 4) - 0.2)  # a regime with few configurations stays compact
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{regime} ({mine[0]['train_size']:,} images): mean ± sd, dots = seeds")
        ax = axes[1][j]
        for config in names:
            runs = [r for r in mine if r["config"] == config]
            ax.scatter(
                [r["hidden_energy"] for r in runs],
                [100 * r["test_acc"] for r in runs],
                label=config,
                color=colors[config],
                marker="s" if config == "baseline" else "o",
                s=22,
            )
        ax.set_xlabel("hidden layers' MHE s=2 energy, half space (mean of 10 layers; lower = more uniform)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{regime}: accuracy vs hidden-layer uniformity (one point per run)")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], out: Path, name: str) -> str:
    """Write `<name>_table.md` and `<name>.png` from the rows (nothing else); returns the table."""
    table = markdown_report(rows)
    overhead_csv = out / f"{name}_overhead.csv"
    if overhead_csv.exists():
        with overhead_csv.open() as f:
            overhead = [
                {**r, "round": int(r["round"]), "seconds_per_step": float(r["seconds_per_step"])}
                for r in csv.DictReader(f)
            ]
        table += "\n" + overhead_table(overhead)
    (out / f"{name}_table.md").write_text(table)
    plot(rows, out / f"{name}.png")
    return table


# -- main ---------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[Job]:
    """Every job of the study, regime by regime, then seed by seed (a stopped regime has about as
    many seeds of each configuration)."""
    jobs = []
    for regime_name in args.regimes:
        for seed in range(args.seeds):
            regime = REGIMES[regime_name]
            configs = list(args.configs or regime.configs or CONFIGS)  # --configs: exactly these, every regime
            if args.smoke:
                regime = Regime(per_class=20, epochs=1)
                configs = list(args.configs or SMOKE_CONFIGS)
            epochs = args.epochs.get(regime_name, regime.epochs)
            for config in configs:
                jobs.append(
                    Job(
                        config,
                        regime_name,
                        seed,
                        epochs,
                        regime.per_class,
                        args.scale,
                        args.width,
                        args.device,
                        None if args.data is None else str(args.data),
                        args.smoke,
                    )
                )
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--regimes", nargs="+", default=list(DEFAULT_REGIMES), choices=list(REGIMES))
    parser.add_argument(
        "--configs",
        nargs="*",
        default=None,
        help=f"of {list(CONFIGS)}: exactly these in every regime (default: each regime's own list)",
    )
    parser.add_argument(
        "--epochs", nargs="*", default=[], metavar="REGIME=N", help="override a regime's epochs, e.g. full=3"
    )
    parser.add_argument("--scale", type=float, default=0.1, help="global factor on the papers' coefficients")
    parser.add_argument("--width", choices=list(WIDTHS), default="small", help="CNN-9 widths 16/32/64 or 64/128/256")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]; on a GPU the data live on the GPU")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs (processes)")
    parser.add_argument("--data", type=Path, default=None, help="a folder of idx files (default: the standard places)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--name", default="reproduction_fashion", help="prefix of the files written into --out")
    parser.add_argument("--smoke", action="store_true", help="20 images per class, 1 epoch, 1 seed, 3 configurations")
    parser.add_argument("--report-only", action="store_true", help="redraw table and plot from the CSV (no training)")
    parser.add_argument(
        "--overhead", action="store_true", help="time the steps of every configuration apart (<name>_overhead.csv)"
    )
    args = parser.parse_args()
    unknown = [c for c in args.configs or () if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    try:
        args.epochs = {k: int(v) for k, v in (item.split("=") for item in args.epochs)}
    except ValueError:
        parser.error("--epochs takes REGIME=N pairs")
    if args.smoke:
        args.seeds, args.workers, args.regimes = 1, 1, ["smoke"]
        REGIMES["smoke"] = Regime(per_class=20, epochs=1)

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"{args.name}_runs.csv"
    rows = read_rows(csv_path)
    if args.overhead:
        measured = measure_overhead(args, **({"steps": 2, "warmup": 1, "rounds": 1} if args.smoke else {}))
        with (args.out / f"{args.name}_overhead.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["round", "config", "seconds_per_step"])
            writer.writeheader()
            writer.writerows(measured)
        print(overhead_table(measured))
        if not rows:
            return
        args.report_only = True
    if args.report_only:
        if not rows:
            parser.error(f"{csv_path} holds no runs")
        print(write_report(rows, args.out, args.name))
        return

    done = {(r["config"], r["regime"], r["seed"]) for r in rows}
    jobs = [j for j in plan(args) if (j.config, j.regime, j.seed) not in done]
    print(f"{len(jobs)} runs to do ({len(done)} already in {csv_path}), {args.workers} worker(s)", flush=True)
    (args.out / f"{args.name}_args.json").write_text(
        json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}, indent=1)
    )
    new_file = not csv_path.exists()
    start = time.perf_counter()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FIELDS))
        if new_file:
            writer.writeheader()

        def record(row: dict[str, Any]) -> None:
            writer.writerow(row)
            f.flush()  # a stopped study keeps every finished run
            rows.append(row)
            print(
                f"{row['regime']:5s} {row['config']:14s} seed {row['seed']}: test {row['test_acc']:.4f} "
                f"val {row['val_acc']:.4f} (fit {row['fit_seconds']:.0f} s) "
                f"[{(time.perf_counter() - start) / 60:.1f} min]",
                flush=True,
            )

        if args.workers > 1 and len(jobs) > 1:
            import multiprocessing

            # spawn: a fresh interpreter per worker, no forked torch/Lightning state
            with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for future in as_completed([pool.submit(run, job) for job in jobs]):
                    record(future.result())
        else:
            for job in jobs:
                record(run(job))
    elapsed = time.perf_counter() - start
    print("\n" + write_report(rows, args.out, args.name))
    print(f"{len(jobs)} runs in {elapsed / 60:.1f} min, {args.workers} worker(s); wrote {args.out}/{args.name}*")


if __name__ == "__main__":
    main()
