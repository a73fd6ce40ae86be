"""A LightningCLI entry point for the CLI tests: ``python cli_app.py fit --config ...``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI
from models import TinyNet


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(TinyNet, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
