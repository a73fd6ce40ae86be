"""The report's `--labels`, Δ columns, `--json` and `--html`, checked against angles computed independently."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
import torch
from metrics.geometry import dense_angles

from lightning_hsu.report import main

from .test_report import PNG_MAGIC, table_rows


def save_runs(tmp_path: Path, count: int) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """`count` checkpoints of the same two layers with different weights."""
    g = torch.Generator().manual_seed(0)
    paths, states = [], []
    for i in range(count):
        state = {"enc.fc.weight": torch.randn(12, 6, generator=g), "head.weight": torch.randn(4, 32, generator=g)}
        path = tmp_path / f"run{i}" / "last.ckpt"  # the same file name: labels must tell them apart
        path.parent.mkdir()
        torch.save({"state_dict": state}, path)
        paths.append(path)
        states.append(state)
    return paths, states


def min_angle(weight: torch.Tensor) -> float:
    return float(dense_angles(weight).min())


def test_labels_name_the_runs_and_delta_is_second_minus_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (a, b), (sa, sb) = save_runs(tmp_path, 2)
    assert main([str(a), "--compare", str(b), "--labels", "plain", "mhe"]) == 0
    out = capsys.readouterr().out
    header, _, *body = table_rows(out)
    assert header[:4] == ["layer", "checkpoint", "min∠ (°)", "Δ min∠"]
    assert [r[:2] for r in body] == [["enc.fc", "plain"], ["enc.fc", "mhe"], ["head", "plain"], ["head", "mhe"]]
    assert str(a) not in out and "last.ckpt" not in out
    assert body[0][3] == ""  # the reference run has no Δ
    for row, name in ((body[1], "enc.fc"), (body[3], "head")):
        expected = min_angle(sb[f"{name}.weight"]) - min_angle(sa[f"{name}.weight"])
        assert row[3].startswith(("+", "-"))
        assert float(row[3]) == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_three_runs_are_each_compared_with_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths, states = save_runs(tmp_path, 3)
    assert main([str(paths[0]), "--compare", str(paths[1]), str(paths[2]), "--labels", "a", "b", "c"]) == 0
    body = table_rows(capsys.readouterr().out)[2:]
    head_rows = {r[1]: r for r in body if r[0] == "head"}
    reference = min_angle(states[0]["head.weight"])
    for label, state in (("b", states[1]), ("c", states[2])):
        assert float(head_rows[label][3]) == pytest.approx(min_angle(state["head.weight"]) - reference, rel=1e-3)


def test_labels_must_match_the_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (a, b), _ = save_runs(tmp_path, 2)
    for labels in (["only"], ["same", "same"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a), "--compare", str(b), "--labels", *labels])
        assert exit_info.value.code == 2
        assert "--labels" in capsys.readouterr().err


def test_json_holds_the_numbers_the_table_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (a, b), (sa, sb) = save_runs(tmp_path, 2)
    argv = [str(a), "--compare", str(b), "--labels", "plain", "mhe"]
    assert main(argv) == 0
    header, _, *body = table_rows(capsys.readouterr().out)
    assert main([*argv, "--json", "--png", str(tmp_path / "angles.png")]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout is the JSON alone, even with --png
    assert "angles.png" in captured.err
    assert [r["label"] for r in data["runs"]] == ["plain", "mhe"]
    assert data["reference"] == "plain"
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert list(layers) == ["enc.fc", "head"]
    assert layers["head"]["runs"]["mhe"]["shape"] == [4, 32]
    # Independent: the minimum angle of each run, and their difference.
    assert layers["head"]["runs"]["mhe"]["metrics"]["min_angle"] == pytest.approx(min_angle(sb["head.weight"]), 1e-4)
    expected_delta = min_angle(sb["enc.fc.weight"]) - min_angle(sa["enc.fc.weight"])
    assert layers["enc.fc"]["delta"]["mhe"]["min_angle"] == pytest.approx(expected_delta, rel=1e-4, abs=1e-4)
    # Every number of the table is in the JSON (the table rounds to 4 significant digits).
    columns = {"min∠ (°)": "min_angle", "mean∠ (°)": "mean_angle", "energy": "energy", "erank": "effective_rank"}
    for row in body:
        layer, label = row[0], row[1]
        for title, key in columns.items():
            value = layers[layer]["runs"][label]["metrics"][key]
            assert float(row[header.index(title)]) == pytest.approx(value, rel=1e-3, abs=1e-4)
            delta = row[header.index(title) + 1]
            if label == "mhe":
                assert float(delta) == pytest.approx(layers[layer]["delta"]["mhe"][key], rel=1e-3, abs=1e-4)


def test_html_is_one_page_with_the_table_and_an_embedded_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import matplotlib.image

    (a, b), (sa, _) = save_runs(tmp_path, 2)
    page = tmp_path / "report.html"
    assert main([str(a), "--compare", str(b), "--labels", "plain", "mhe", "--html", str(page)]) == 0
    capsys.readouterr()
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<table>" in text and "<th>Δ min∠</th>" in text
    assert "<td>enc.fc</td><td>plain</td>" in text
    cell = re.search(r"<td>head</td><td>plain</td><td>([^<]+)</td>", text)
    assert cell is not None and float(cell.group(1)) == pytest.approx(min_angle(sa["head.weight"]), rel=1e-3)
    assert not re.search(r"https?://", text)  # self-contained: no external assets or links
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    png = base64.b64decode(sources[0].split(",", 1)[1])
    assert png[:8] == PNG_MAGIC
    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert image.shape[0] > 200 and image.shape[1] > 400
