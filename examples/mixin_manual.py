"""The mixin in a LightningModule with manual optimisation.

When you write the optimisation step yourself (``automatic_optimization = False``: custom
clipping, several optimizers, GANs), a callback cannot know which loss you backpropagate. Declare
the rules in the module with :class:`~lightning_hsu.HypersphericalUniformityMixin` and add
``self.hyperspherical_penalty(optimizer)`` to the loss yourself; given the optimizer, the penalty
covers only the layers that optimizer steps.

The rules here mix two regularisers, as the AISTATS 2021 paper's tables do per layer type:
hidden layers get half-space MHE (s = 2, λ = 1), the classifier gets MHS, the Tammes-style
max-min separation, with the paper's classifier coefficient λ = 1. They are plain dicts, so
``save_hyperparameters`` stores them and the checkpoint reloads with ``weights_only=True``.

    python examples/mixin_manual.py            # ~30 s
    python examples/mixin_manual.py --smoke    # a few seconds
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from digits import DigitsCNN, loaders, quiet_lightning, quiet_trainer_kwargs
from torch import nn

from lightning_hsu import HypersphericalUniformityMixin

RULES = (
    {"regularizer": "mhe", "coefficient": 1.0, "options": {"power": 2.0, "half_space": True}, "target": "hidden"},
    {"regularizer": "mhs", "coefficient": 1.0, "target": "classifier"},
)


class ManualDigitsCNN(HypersphericalUniformityMixin, DigitsCNN):
    """``DigitsCNN`` trained by a hand-written step, with its penalty rules declared inside it.

    The mixin comes first in the bases so that its ``on_fit_start`` runs before Lightning's.
    """

    def __init__(self, hsu_rules: tuple[dict, ...] = RULES, lr: float = 0.05, max_epochs_hint: int = 10) -> None:
        super().__init__(lr=lr, max_epochs_hint=max_epochs_hint)
        self.save_hyperparameters()  # the rules travel with the checkpoint
        self.automatic_optimization = False
        # classifier="classifier" names the layer that target="classifier" means (the default,
        # "auto", would pick the same one here: the last nn.Linear).
        self.configure_hyperspherical(rules=list(hsu_rules), classifier="classifier")

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        optimizer = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        # Σ λ·R over the layers this optimizer steps, from the current weights.
        penalty = self.hyperspherical_penalty(optimizer)
        optimizer.zero_grad()
        self.manual_backward(loss + penalty)
        # Manual optimisation means manual clipping, too: a reason to write the step by hand.
        self.clip_gradients(optimizer, gradient_clip_val=5.0, gradient_clip_algorithm="norm")
        optimizer.step()
        if self.trainer.is_last_batch:
            self.lr_schedulers().step()
        self.log_dict({"train_loss": loss, "penalty": penalty}, prog_bar=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="1 epoch on 128 samples (for tests)")
    args = parser.parse_args()
    quiet_lightning()
    if args.smoke:
        args.epochs = 1

    pl.seed_everything(args.seed, verbose=False)
    train_loader, test_loader = loaders(limit=128 if args.smoke else None, seed=args.seed)
    model = ManualDigitsCNN(max_epochs_hint=args.epochs)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(max_epochs=args.epochs, default_root_dir=root, logger=False, **quiet_trainer_kwargs())
        trainer.fit(model, train_loader)
        engine = model.hyperspherical_engine
        assert engine is not None
        values = engine.last_values  # unweighted R per "<layer>/<rule>" at the last step
        (result,) = trainer.test(model, test_loader, verbose=False)

        checkpoint = Path(root) / "manual.ckpt"
        trainer.save_checkpoint(checkpoint)
        reloaded = ManualDigitsCNN.load_from_checkpoint(checkpoint, weights_only=True)

    print(f"\nManual optimisation, {args.epochs} epoch(s): test accuracy {result['test_acc']:.4f}")
    print("last step's penalties (unweighted):")
    for key, value in values.items():
        print(f"  {key:24s} {value:+.4f}")
    print(f"rules reloaded from the checkpoint: {[r['regularizer'] for r in reloaded.hparams.hsu_rules]}")
    trained, loaded = model.state_dict(), reloaded.state_dict()
    same = trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    print(f"reloaded weights equal the trained ones: {same}")


if __name__ == "__main__":
    main()
