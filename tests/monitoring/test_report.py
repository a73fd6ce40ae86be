"""``python -m lightning_hsu.report`` on a real Lightning checkpoint: the table and a valid PNG."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from lightning_hsu.functional import neurons_of
from lightning_hsu.functional.diversity import diversity_summary
from lightning_hsu.report import layer_neurons, load_state_dict, main

from .conftest import Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_table_and_png(trained_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "angles.png"
    assert main([str(trained_run.checkpoint), "--png", str(png)]) == 0
    rows = table_rows(capsys.readouterr().out)
    header, body = rows[0], rows[2:]
    assert header[:3] == ["layer", "n×d", "min∠ (°)"]
    assert [r[0] for r in body] == ["fc1", "conv", "head"]  # the LayerNorm's 1-D weight is not a layer
    assert [r[1] for r in body] == ["16×4", "5×6", "3×30"]
    expected = diversity_summary(neurons_of(trained_run.model.conv))["min_angle"]
    assert float(body[1][2]) == pytest.approx(expected, rel=1e-3)
    assert_valid_png(png)


def test_layers_half_space_and_compare(trained_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A second checkpoint as a user would have from another run: here fc1 made orthogonal-ish.
    checkpoint = torch.load(trained_run.checkpoint, weights_only=True)
    torch.nn.init.orthogonal_(checkpoint["state_dict"]["fc1.weight"])
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    png = tmp_path / "compare.png"
    argv = [str(trained_run.checkpoint), "--compare", str(other), "--layers", "fc*", "--half-space", "--png", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "half-space" in out
    rows = table_rows(out)
    assert rows[0][:2] == ["layer", "checkpoint"]
    assert [(r[0], r[1]) for r in rows[2:]] == [("fc1", "last.ckpt"), ("fc1", "other.ckpt")]
    orthogonal = neurons_of(checkpoint["state_dict"]["fc1.weight"])
    expected = diversity_summary(orthogonal, half_space=True)["min_angle"]
    assert float(rows[3][2]) == pytest.approx(expected, rel=1e-3)
    assert_valid_png(png)


def test_errors_name_the_problem(trained_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(trained_run.checkpoint), "--layers", "decoder*"]) == 2
    assert "--layers pattern 'decoder*' matches no layer" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


def test_transpose_pattern_reads_output_channels(tmp_path: Path) -> None:
    deconv = torch.nn.ConvTranspose2d(3, 7, kernel_size=2)  # weight [in=3, out=7, 2, 2]
    path = tmp_path / "deconv.pt"
    torch.save({"state_dict": {"up.weight": deconv.weight.detach(), "up.bias": deconv.bias.detach()}}, path)
    state = load_state_dict(path)
    assert layer_neurons(state)["up"].shape == (3, 28)  # as a convolution: wrong, and undetectable
    read = layer_neurons(state, transpose=["up"])["up"]
    assert torch.equal(read, neurons_of(deconv).detach())  # 7 output channels, like the module


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_module_entry_point(
    trained_run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `python -m lightning_hsu.report ...`, in this process (a subprocess would re-import torch).
    monkeypatch.setattr(sys, "argv", ["report", str(trained_run.checkpoint), "--layers", "head"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lightning_hsu.report", run_name="__main__")
    assert exit_info.value.code == 0
    assert "| head | 3×30 |" in capsys.readouterr().out
