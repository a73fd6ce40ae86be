"""Quickstart: add hyperspherical energy to an existing LightningModule with one callback.

``DigitsCNN`` (examples/digits.py) is a plain LightningModule that knows nothing about the
regulariser. We train it twice on scikit-learn's digits with the same seed: once as it is, once with
``HypersphericalUniformity(preset="mhe")`` — the MHE paper's defaults (Liu et al., NeurIPS 2018):
hidden layers half-space MHE (s = 2) with λ = 1, the classifier full-space MHE with λ = 10.
``NeuronDiversityMonitor`` logs every layer's neuron-angle metrics to the CSV logger, and the script
prints test accuracy, the penalty and the minimum pairwise angle of each layer for both runs.

    python examples/quickstart.py            # 1-3 minutes on a 2-core CPU
    python examples/quickstart.py --smoke    # a few seconds: what the tests run
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import lightning.pytorch as pl
from digits import DigitsCNN, loaders, quiet_lightning, quiet_trainer_kwargs
from lightning.pytorch.loggers import CSVLogger
from study import last_logged

from lightning_hsu import HypersphericalUniformity

try:  # the monitor ships with lightning_hsu; the guard keeps the quickstart usable without it
    from lightning_hsu.callbacks import NeuronDiversityMonitor
except ImportError:  # pragma: no cover
    NeuronDiversityMonitor = None  # type: ignore[assignment,misc]

LAYERS = ("conv1", "conv2", "fc", "classifier")


def train(regularised: bool, args: argparse.Namespace, root: Path) -> dict[str, float]:
    pl.seed_everything(args.seed, verbose=False)
    limit = 128 if args.smoke else None
    train_loader, test_loader = loaders(batch_size=64, limit=limit, seed=args.seed)
    model = DigitsCNN(max_epochs_hint=args.epochs)
    name = "mhe" if regularised else "baseline"
    print(f"training {name} for {args.epochs} epoch(s)...", flush=True)
    logger = CSVLogger(root, name=name, version=0)
    callbacks: list[pl.Callback] = []
    if regularised:
        # The one line a user adds. The preset picks every Linear/Conv layer, and treats the last
        # nn.Linear ("classifier") as the classifier: full space, its own coefficient.
        callbacks.append(HypersphericalUniformity(preset="mhe"))
    if NeuronDiversityMonitor is not None:
        # Works with or without the regulariser: it only reads the weights, at every epoch end.
        # full space for every layer (half_space=False): the baseline and the regularised runs are measured alike
        monitor = NeuronDiversityMonitor(
            metrics=["min_angle", "mean_nn_angle", "energy"], log_figures=False, half_space=False
        )
        callbacks.append(monitor)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1 if args.smoke else 5,
        **quiet_trainer_kwargs(),
    )
    trainer.fit(model, train_loader)
    # Read the penalty before testing: trainer.test replaces callback_metrics with the test metrics.
    penalty = float(trainer.callback_metrics.get("hsu/penalty", math.nan))
    (result,) = trainer.test(model, test_loader, verbose=False)
    logged = last_logged(Path(logger.log_dir) / "metrics.csv")
    out = {"test_acc": result["test_acc"], "penalty": penalty}
    for layer in LAYERS:
        out[f"{layer}/min_angle"] = logged.get(f"hsu/diversity/{layer}/min_angle", math.nan)
    out["log_dir"] = logger.log_dir  # type: ignore[assignment]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("runs/quickstart"), help="where the CSV logs go")
    parser.add_argument("--smoke", action="store_true", help="1 epoch on 128 samples (for tests)")
    args = parser.parse_args()
    quiet_lightning()
    if args.smoke:
        args.epochs = 1

    start = time.perf_counter()
    runs = {"baseline": train(False, args, args.root), "MHE preset": train(True, args, args.root)}
    elapsed = time.perf_counter() - start

    print(f"\nDigitsCNN on scikit-learn digits, {args.epochs} epoch(s), seed {args.seed}, {elapsed:.0f} s")
    header = ["run", "test acc", "penalty"] + [f"min∠ {layer} (°)" for layer in LAYERS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, r in runs.items():
        cells = [label, f"{r['test_acc']:.4f}", "-" if math.isnan(r["penalty"]) else f"{r['penalty']:.3f}"]
        cells += [f"{r[f'{layer}/min_angle']:.1f}" for layer in LAYERS]
        print("| " + " | ".join(cells) + " |")
    print(
        "\npenalty = Σ λ·MHE over the four layers at the last step (the preset: λ = 1 hidden half-space, "
        "10 classifier);\nmin∠ = smallest angle between two neurons of the layer (full space), logged by "
        "NeuronDiversityMonitor.\nCSV logs (every metric, every epoch): "
        + ", ".join(str(r["log_dir"]) for r in runs.values())
    )


if __name__ == "__main__":
    main()
