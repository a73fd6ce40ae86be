"""LightningCLI: the regulariser is switched on from YAML, with no change to the model's code.

``cli_config.yaml`` next to this file adds ``lightning_hsu.HypersphericalUniformity`` to the
trainer's callbacks: half-space MHE on the hidden layers, MHS on the classifier with a linear
warm-up of its coefficient, and ``NeuronDiversityMonitor`` to log the neuron angles. Every option
of the callback is a constructor argument, so anything it can do can be written in the YAML (or
overridden on the command line, ``--trainer.callbacks+=...``).

    python examples/cli.py fit --config examples/cli_config.yaml
    python examples/cli.py fit --config examples/cli_config.yaml --trainer.max_epochs 1 --data.limit 128  # smoke
    python examples/cli.py fit --print_config   # every option, with the defaults

Lightning saves the resolved config next to the logs (``config.yaml``); re-running it reproduces
the run, callback included.
"""

from __future__ import annotations

from digits import DigitsCNN, DigitsDataModule
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    # seed_everything_default: the YAML may override it; without a seed runs would not be comparable.
    return LightningCLI(
        DigitsCNN, DigitsDataModule, args=args, seed_everything_default=0, save_config_kwargs={"overwrite": True}
    )


if __name__ == "__main__":
    main()
