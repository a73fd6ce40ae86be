"""Every example runs to completion at smoke size (``pytest -m examples`` runs only these).

Each example runs as a script in a subprocess, as a user would run it: the examples import their
shared ``digits`` module from their own folder, and ``examples/ddp.py`` must be a script because
Lightning's ``"ddp"`` strategy starts rank 1 by re-running it. Runs happen in a temporary working
directory so that logs never land in the repository.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
#: Generous: a smoke run takes 5-30 s, but this machine's cores are shared.
TIMEOUT = 240

pytestmark = pytest.mark.examples


def run_example(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_quickstart(tmp_path: Path):
    out = run_example("quickstart.py", "--smoke", "--root", str(tmp_path / "runs"), cwd=tmp_path)
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"baseline", "MHE preset"} <= set(lines)
    # The regularised run reports a penalty; the baseline has none. Min angles come from the monitor.
    mhe_cells = [c.strip() for c in lines["MHE preset"].split("|")[1:-1]]
    assert float(mhe_cells[2]) > 0
    assert all(0 < float(c) <= 180 for c in mhe_cells[3:])
    assert (tmp_path / "runs" / "mhe" / "version_0" / "metrics.csv").exists()


def test_mixin_manual(tmp_path: Path):
    out = run_example("mixin_manual.py", "--smoke", cwd=tmp_path)
    assert "classifier/mhs" in out and "conv1/mhe" in out
    assert "rules reloaded from the checkpoint: ['mhe', 'mhs']" in out
    assert "reloaded weights equal the trained ones: True" in out


def test_cli_yaml_turns_the_regulariser_on(tmp_path: Path):
    root = tmp_path / "cli"
    run_example(
        "cli.py",
        "fit",
        "--config",
        str(EXAMPLES / "cli_config.yaml"),
        "--trainer.max_epochs=1",
        "--data.limit=128",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        cwd=tmp_path,
    )
    (metrics,) = root.rglob("metrics.csv")
    with metrics.open() as f:
        columns = set(next(csv.reader(f)))
    # the callback's penalties and the monitor's angles both reached the CSV logger
    assert {"hsu/penalty", "hsu/penalty/conv1", "hsu/penalty/classifier", "hsu/diversity/conv1/min_angle"} <= columns
    (saved,) = root.rglob("config.yaml")
    assert "lightning_hsu.HypersphericalUniformity" in saved.read_text()


@pytest.mark.distributed
def test_ddp_two_processes(tmp_path: Path):
    out = run_example("ddp.py", "--smoke", cwd=tmp_path)
    assert "DDP, 2 CPU processes" in out
    assert out.count("weight checksum") == 2
    assert "replicas agree: True" in out


def test_reproduction(tmp_path: Path):
    out_dir = tmp_path / "docs"
    run_example("reproduction.py", "--smoke", "--out", str(out_dir), cwd=tmp_path)
    table = (out_dir / "reproduction_table.md").read_text()
    assert "| baseline |" in table and "| MHE s=2 half |" in table
    with (out_dir / "reproduction_runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4  # 2 configurations × 2 seeds
    assert (out_dir / "reproduction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpt2_lm(tmp_path: Path):
    pytest.importorskip("transformers", reason="examples/gpt2_lm.py needs transformers")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "gpt2_lm.py"), "--smoke", "--root", str(tmp_path / "runs")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"gpt2_lm.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines() if line.startswith("| ")]
    runs = {cells[0]: cells for cells in rows if len(cells) == 5 and cells[0] != "run"}
    assert {"baseline", "MHE preset"} <= set(runs), proc.stdout
    for cells in runs.values():
        loss, bits, perplexity = (float(c) for c in cells[1:4])
        assert 0 < loss < 10 and abs(perplexity - math.exp(loss)) <= 1e-3 * perplexity
        assert abs(bits - loss / math.log(2)) < 1e-3
    # the baseline has no penalty, the regularised run a positive one
    assert runs["baseline"][4] == "–"
    assert float(runs["MHE preset"][4]) > 0
    # one row per regularised layer (the layers listed from callback.engine.bindings), both runs' angles
    layers = {cells[0]: cells for cells in rows if len(cells) == 4 and cells[0] != "layer"}
    assert layers, proc.stdout
    listed = proc.stdout.split("(callback.engine.bindings):")[1].split("\n\n")[0]
    assert {line.split(":")[0].strip() for line in listed.strip().splitlines()} == set(layers)
    for layer, cells in layers.items():
        assert cells[1].startswith("mhe"), cells
        assert all(0 < float(angle) <= 180 for angle in cells[2:]), f"{layer}: {cells}"
    assert (tmp_path / "runs" / "mhe" / "version_0" / "metrics.csv").exists()


def test_fashion_study_smoke(tmp_path: Path, fashion_writer):
    # synthetic idx files (30 images per class): hermetic, nothing installed or downloaded
    fashion_writer(tmp_path / "data", "torchvision", n_train=300, n_test=100)
    out_dir = tmp_path / "docs"
    common = ("--data", str(tmp_path / "data"), "--out", str(out_dir), "--name", "fashion")
    run_example("fashion_study.py", "--smoke", *common, cwd=tmp_path)
    with (out_dir / "fashion_runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["baseline", "MHE s=2 half", "MHP"]
    assert all(0 <= float(r["test_acc"]) <= 1 and 0 < float(r["hidden_min_angle"]) <= 90 for r in rows)
    table = (out_dir / "fashion_table.md").read_text()
    assert "| baseline |" in table and "| MHP | 0.1 / 1 |" in table
    assert (out_dir / "fashion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resumable: a second run finds every row done and trains nothing
    out = run_example("fashion_study.py", "--smoke", *common, cwd=tmp_path)
    assert "0 runs to do (3 already in" in out
    # the table is regenerated from the CSV alone
    (out_dir / "fashion_table.md").unlink()
    run_example("fashion_study.py", "--report-only", "--out", str(out_dir), "--name", "fashion", cwd=tmp_path)
    assert (out_dir / "fashion_table.md").read_text() == table


def test_fashion_study_full_width_on_cpu(tmp_path: Path, fashion_writer):
    # the GPU study's network (64/128/256 channels) constructs and trains a step with --device cpu
    fashion_writer(tmp_path / "data", "debian", n_train=300, n_test=100)
    out_dir = tmp_path / "docs"
    run_example(
        "fashion_study.py",
        "--smoke",
        "--width",
        "full",
        "--device",
        "cpu",
        "--configs",
        "MHE s=2 half",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out_dir),
        cwd=tmp_path,
    )
    with (out_dir / "reproduction_fashion_runs.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["width"] == "full" and row["device"] == "cpu" and int(row["steps"]) == 2


def test_fashion_study_overhead_smoke(tmp_path: Path, fashion_writer):
    fashion_writer(tmp_path / "data", n_train=300, n_test=100)
    out_dir = tmp_path / "docs"
    out = run_example(
        "fashion_study.py",
        "--smoke",
        "--overhead",
        "--configs",
        "baseline",
        "R-MHP",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out_dir),
        cwd=tmp_path,
    )
    assert "| R-MHP |" in out
    with (out_dir / "reproduction_fashion_overhead.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["baseline", "R-MHP"] and all(float(r["seconds_per_step"]) > 0 for r in rows)
