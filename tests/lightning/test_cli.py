"""LightningCLI: the callback is built from YAML, and the config Lightning saves re-runs."""

from __future__ import annotations

from pathlib import Path

import yaml
from cli_app import main

from lightning_hsu import MHS, HypersphericalUniformity, LinearWarmup

CONFIG = """
seed_everything: 0
trainer:
  max_steps: 2
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_hsu.HypersphericalUniformity
      init_args:
        rules:
          - regularizer: mhe
            coefficient: 1.0
            options: {{half_space: true}}
            target: hidden
          - regularizer:
              class_path: lightning_hsu.MHS
              init_args: {{temperature: 0.1}}
            coefficient: 0.5
            target: classifier
            schedule:
              class_path: lightning_hsu.LinearWarmup
              init_args: {{warmup_steps: 2}}
        every_n_steps: 1
"""


def _callback(cli) -> HypersphericalUniformity:
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, HypersphericalUniformity)]
    return cb


def test_yaml_config_builds_the_callback_and_trains(tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    cli = main(["fit", "--config", str(config)])
    cb = _callback(cli)
    hidden, classifier = cb.rules
    assert hidden.regularizer == "mhe" and hidden.options == {"half_space": True} and hidden.target == "hidden"
    assert isinstance(classifier.regularizer, MHS) and classifier.regularizer.temperature == 0.1
    assert isinstance(classifier.schedule, LinearWarmup) and classifier.schedule.warmup_steps == 2
    assert cli.trainer.global_step == 2
    assert set(cb.engine.last_values) == {"conv/mhe", "hidden/mhe", "fc/mhs"}


def test_saved_config_reruns_with_the_same_callback(tmp_path: Path):
    (tmp_path / "in").mkdir()
    config = tmp_path / "in" / "config.yaml"
    config.write_text(CONFIG.format(root=tmp_path / "run"))
    main(["fit", "--config", str(config)])
    saved = tmp_path / "run" / "config.yaml"  # written by LightningCLI's SaveConfigCallback
    text = yaml.safe_load(saved.read_text())
    assert text["trainer"]["callbacks"][0]["class_path"].endswith("HypersphericalUniformity")
    rerun = main(["fit", "--config", str(saved), "--trainer.default_root_dir", str(tmp_path / "again")])
    first, second = _callback(rerun).rules, _callback(main(["fit", "--config", str(config)])).rules
    assert [r.label for r in first] == [r.label for r in second]
    assert first[1].regularizer.hparams() == second[1].regularizer.hparams()
    assert rerun.trainer.global_step == 2
