"""Reproduction study: does hyperspherical uniformity help a small CNN on real data?

Baseline against MHE (full and half-space hidden layers, s = 0, 1, 2), MHS, MGD, CoMHE and the
Wang–Isola uniformity, each over several seeds, on scikit-learn's digits (1,797 8×8 images, a
fixed stratified 60/40 train/test split; see examples/digits.py). Every run trains ``DigitsCNN``
with the same optimiser and schedule; only the ``HypersphericalUniformity`` callback differs.
At the end it reports test accuracy (mean ± std over seeds) and the diversity of the trained
neurons (minimum pairwise angle and hyperspherical energy), writes a markdown table, a CSV of
every run and a plot.

Coefficients follow the papers' conventions (``lightning_hsu.rules.PRESETS``): hidden layers
(conv1, conv2, fc) regularised with λ_hidden, the classifier in full space with λ_classifier:
MHE 1/10 (NeurIPS 2018), MHS 0.1/1, MGD 0.01/0.1 (AISTATS 2021), CoMHE 1/10 with 20 projections
to 40 dimensions (CVPR 2020). The papers give no coefficient for the uniformity as a weight
regulariser; it uses MHE's 1/10. ``--scale`` multiplies every coefficient (the only knob tuned).

    python examples/reproduction.py                       # the study in the docs (~7 min, 2 workers on 2 cores)
    python examples/reproduction.py --scale 0.1 --name reproduction_scale0.1   # the tuned variant in the docs
    python examples/reproduction.py --smoke --out /tmp/r  # two configurations, one seed, seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study import CONFIGS as ALL_CONFIGS
from study import rules_for

#: The configurations of the digits study (`study.CONFIGS` holds their options and coefficients).
CONFIGS = {
    name: ALL_CONFIGS[name]
    for name in (
        "baseline",
        "MHE s=0 full",
        "MHE s=0 half",
        "MHE s=1 full",
        "MHE s=1 half",
        "MHE s=2 full",
        "MHE s=2 half",
        "MHS",
        "MGD",
        "CoMHE",
        "uniformity",
    )
}
SMOKE_CONFIGS = ("baseline", "MHE s=2 half")
HIDDEN = ("conv1", "conv2", "fc")
CLASSIFIER = "classifier"


@dataclass
class Job:
    config: str
    seed: int
    epochs: int
    scale: float
    limit: int | None


def diversity(model) -> dict[str, float]:
    """Min angle (degrees) and MHE energy (s = 2) of the trained neurons.

    Hidden layers are measured in half-space (angles between lines: a neuron and its negation are
    the same feature up to sign, and BatchNorm/ReLU follow), the classifier in full space, as the
    papers regularise them. The hidden numbers are averages over conv1, conv2 and fc.
    """
    from lightning_hsu.functional import neurons_of
    from lightning_hsu.functional.diversity import diversity_summary

    out: dict[str, float] = {}
    hidden = [
        diversity_summary(neurons_of(getattr(model, layer)), metrics=["min_angle", "energy"], half_space=True)
        for layer in HIDDEN
    ]
    for layer, summary in zip(HIDDEN, hidden, strict=True):
        out[f"{layer}_min_angle"] = summary["min_angle"]
    out["hidden_min_angle"] = statistics.fmean(s["min_angle"] for s in hidden)
    out["hidden_energy"] = statistics.fmean(s["energy"] for s in hidden)
    classifier = diversity_summary(neurons_of(model.classifier), metrics=["min_angle", "energy"])
    out["classifier_min_angle"] = classifier["min_angle"]
    out["classifier_energy"] = classifier["energy"]
    return out


def run(job: Job) -> dict[str, Any]:
    """Train one (configuration, seed) and return its test accuracy and diversity metrics."""
    import warnings

    import lightning.pytorch as pl
    import torch
    from digits import DigitsCNN, loaders, quiet_trainer_kwargs

    from lightning_hsu import HypersphericalUniformity

    warnings.filterwarnings("ignore")  # Lightning's advice about workers and log intervals, per run
    torch.set_num_threads(1)  # runs are parallel across processes; one thread each avoids oversubscription
    start = time.perf_counter()
    pl.seed_everything(job.seed, verbose=False)
    train_loader, test_loader = loaders(batch_size=64, limit=job.limit, seed=job.seed)
    model = DigitsCNN(max_epochs_hint=job.epochs)
    rules = rules_for(job.config, job.scale)
    callbacks = [HypersphericalUniformity(rules=rules, classifier=CLASSIFIER, log=False)] if rules else []
    trainer = pl.Trainer(max_epochs=job.epochs, logger=False, callbacks=callbacks, **quiet_trainer_kwargs())
    trainer.fit(model, train_loader)
    (result,) = trainer.test(model, test_loader, verbose=False)
    return {
        "config": job.config,
        "seed": job.seed,
        "test_acc": result["test_acc"],
        **diversity(model),
        "seconds": time.perf_counter() - start,
    }


METRICS = ("test_acc", "hidden_min_angle", "classifier_min_angle", "hidden_energy", "classifier_energy")


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """config → metric → (mean, sample std) over seeds, in the order of :data:`CONFIGS`."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        if not mine:
            continue
        out[config] = {}
        for m in METRICS:
            values = [r[m] for r in mine]
            out[config][m] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def welch_t(a: list[float], b: list[float]) -> float:
    """Welch's t statistic of mean(a) − mean(b); nan when either has fewer than 2 values or no spread."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return math.nan
    return (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)


def markdown_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    summary = summarise(rows)
    seeds = sorted({r["seed"] for r in rows})
    base = [r["test_acc"] for r in rows if r["config"] == "baseline"]
    lines = [
        f"Digits (scikit-learn), DigitsCNN, {args.epochs} epochs, seeds {seeds}, coefficient scale {args.scale:g}. "
        "Mean ± std over seeds. Δ acc and t: difference from the baseline in accuracy points and Welch's t.",
        "",
        "| configuration | λ hidden / classifier | test accuracy (%) | Δ acc | t | hidden min∠ (°) "
        "| classifier min∠ (°) | hidden energy | classifier energy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config, s in summary.items():
        _, _, _, lam_h, lam_c = CONFIGS[config]
        accs = [r["test_acc"] for r in rows if r["config"] == config]
        delta = 100 * (s["test_acc"][0] - statistics.fmean(base)) if base else math.nan
        t = welch_t(accs, base) if config != "baseline" else math.nan
        lam = "—" if config == "baseline" else f"{lam_h * args.scale:g} / {lam_c * args.scale:g}"
        cells = [
            config,
            lam,
            f"{100 * s['test_acc'][0]:.2f} ± {100 * s['test_acc'][1]:.2f}",
            "—" if config == "baseline" else f"{delta:+.2f}",
            "—" if math.isnan(t) else f"{t:+.1f}",
            f"{s['hidden_min_angle'][0]:.1f} ± {s['hidden_min_angle'][1]:.1f}",
            f"{s['classifier_min_angle'][0]:.1f} ± {s['classifier_min_angle'][1]:.1f}",
            f"{s['hidden_energy'][0]:.4f}",
            f"{s['classifier_energy'][0]:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    names = list(summary)
    fig, (ax_acc, ax_angle) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, config in enumerate(names):
        accs = [100 * r["test_acc"] for r in rows if r["config"] == config]
        mean, std = summary[config]["test_acc"]
        color = "grey" if config == "baseline" else "C0"
        ax_acc.errorbar(i, 100 * mean, yerr=100 * std, fmt="o", color=color, capsize=4)
        ax_acc.scatter([i] * len(accs), accs, s=10, color=color, alpha=0.4)
    if "baseline" in summary:
        ax_acc.axhline(100 * summary["baseline"]["test_acc"][0], color="grey", ls="--", lw=0.8)
    ax_acc.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("Test accuracy: mean ± std (dots: seeds)")
    colors = plt.get_cmap("tab20").colors  # 11 configurations: the default 10-colour cycle would repeat
    for i, config in enumerate(names):
        mine = [r for r in rows if r["config"] == config]
        marker = "s" if config == "baseline" else "o"
        ax_angle.scatter(
            [r["hidden_min_angle"] for r in mine],
            [100 * r["test_acc"] for r in mine],
            label=config,
            marker=marker,
            color="black" if config == "baseline" else colors[(2 * i) % 20 + (i >= 10)],
        )
    ax_angle.set_xlabel("hidden layers' minimum angle, half-space (°, mean of 3 layers)")
    ax_angle.set_ylabel("test accuracy (%)")
    ax_angle.set_title("Diversity vs accuracy (one point per run)")
    ax_angle.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every coefficient")
    parser.add_argument("--configs", nargs="*", default=None, help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--name", default="reproduction", help="prefix of the files written into --out")
    parser.add_argument("--smoke", action="store_true", help="2 configurations, 2 seeds, 1 epoch, 128 samples")
    parser.add_argument(
        "--from-csv", type=Path, help="redraw the table and plot from a runs CSV written earlier (no training)"
    )
    args = parser.parse_args()
    configs = list(args.configs or CONFIGS)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    limit = None
    if args.smoke:
        configs, args.seeds, args.epochs, args.workers, limit = list(SMOKE_CONFIGS), 2, 1, 1, 128

    jobs = [Job(c, seed, args.epochs, args.scale, limit) for seed in range(args.seeds) for c in configs]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.from_csv:
        with args.from_csv.open() as f:
            rows = [
                {k: v if k == "config" else int(v) if k == "seed" else float(v) for k, v in r.items()}
                for r in csv.DictReader(f)
            ]
        args.seeds = len({r["seed"] for r in rows})
    elif args.workers > 1:
        import multiprocessing

        # spawn: a fresh interpreter per worker, no forked torch/Lightning state
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for row in pool.map(run, jobs):
                rows.append(row)
                print(f"{row['config']:14s} seed {row['seed']}: acc {row['test_acc']:.4f} ({row['seconds']:.0f} s)")
    else:
        for job in jobs:
            row = run(job)
            rows.append(row)
            print(f"{row['config']:14s} seed {row['seed']}: acc {row['test_acc']:.4f} ({row['seconds']:.0f} s)")
    elapsed = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, args)
    plot(rows, args.out / f"{args.name}.png")
    if args.from_csv:  # the timing line and the raw runs stay those of the training
        print(table)
        return
    (args.out / f"{args.name}_table.md").write_text(
        table + f"\n{len(rows)} runs in {elapsed / 60:.1f} min wall-clock, {args.workers} parallel worker(s).\n"
    )
    with (args.out / f"{args.name}_runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / f"{args.name}_args.json").write_text(
        json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=1)
    )
    print("\n" + table)
    print(f"{len(rows)} runs in {elapsed:.0f} s; wrote {args.out}/{args.name}_table.md, _runs.csv, .png")


if __name__ == "__main__":
    main()
