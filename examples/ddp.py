"""Two-process DDP on CPU (gloo) with the regulariser: ``strategy="ddp"``, ``devices=2``.

Nothing about the callback changes under DDP. Each rank computes the penalty of the full weights
(DDP replicates them) inside the layers' forward pass, so its gradient is all-reduced together
with the data loss, and both ranks keep identical weights. At the end of training the
``ReplicaCheck`` callback below gathers, from both ranks, a checksum of the weights and the last
penalty, and rank 0 prints them: they must agree.

Lightning's ``"ddp"`` strategy starts rank 1 by re-running this script, so run it as a script
(not from a notebook; there use ``strategy="ddp_notebook"``).

    python examples/ddp.py            # ~1 minute
    python examples/ddp.py --smoke    # a few seconds
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from digits import DigitsCNN, loaders, quiet_lightning

from lightning_hsu import HypersphericalUniformity


class ReplicaCheck(pl.Callback):
    """Gather each rank's weight checksum and last penalty at the end of training."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checksum = torch.stack([p.detach().double().sum() for p in pl_module.parameters()]).sum()
        penalty = trainer.callback_metrics.get("hsu/penalty", torch.tensor(float("nan"))).double()
        gathered = pl_module.all_gather(torch.stack([checksum, penalty]))  # [world_size, 2] on every rank
        self.rows = gathered.reshape(-1, 2).tolist()


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
    # Lightning wraps the shuffling loader in a DistributedSampler: each rank sees half of every epoch.
    train_loader, test_loader = loaders(batch_size=32, limit=128 if args.smoke else None, seed=args.seed)
    model = DigitsCNN(max_epochs_hint=args.epochs)
    check = ReplicaCheck()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",  # gloo on CPU
        max_epochs=args.epochs,
        callbacks=[HypersphericalUniformity(preset="mhe"), check],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_loader)

    if trainer.is_global_zero:
        # Tested here on rank 0 on the whole test set: trainer.test would split it over the ranks
        # with a DistributedSampler, which pads it to an even split (counting an image twice).
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader)
        accuracy = correct / len(test_loader.dataset)

        print(f"\nDDP, {trainer.world_size} CPU processes (gloo), {args.epochs} epoch(s), MHE preset")
        for rank, (checksum, penalty) in enumerate(check.rows):
            print(f"  rank {rank}: weight checksum {checksum:.10f}   last penalty {penalty:.6f}")
        (c0, p0), *others = check.rows
        agree = all(abs(c - c0) <= 1e-9 * max(1.0, abs(c0)) and abs(p - p0) <= 1e-6 for c, p in others)
        print(f"  replicas agree: {agree}")
        print(f"  test accuracy: {accuracy:.4f}")
        if not agree:
            raise SystemExit("the two ranks ended with different weights or penalties")


if __name__ == "__main__":
    main()
