"""`python -m lightning_hsu.report` on huge layers (sampled, and says so) and tied weights (once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from metrics.geometry import dense_angles

import lightning_hsu.report as report
from lightning_hsu.functional.diversity import sample_neuron_indices
from lightning_hsu.report import main, merge_tied

from .test_report import table_rows


def tiny_gpt2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)  # random init: nothing is downloaded


def count_profiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = report.diversity_profile

    def counting(neurons: torch.Tensor, **kwargs: Any) -> Any:
        calls.append(int(neurons.shape[0]))
        return real(neurons, **kwargs)

    monkeypatch.setattr(report, "diversity_profile", counting)
    return calls


@pytest.mark.parametrize("form", ["state_dict", "lightning", "equal_copy"])
def test_gpt2_tied_embedding_and_head_are_one_row(
    form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied by GPT-2 itself
    state = model.state_dict()
    prefix = ""
    if form == "lightning":  # a LightningModule holding the model as `self.model`
        prefix = "model."
        state = {"state_dict": {prefix + k: v for k, v in state.items()}, "epoch": 0}
    elif form == "equal_copy":  # the tied tensor saved as two separate, equal tensors
        state = {k: v.clone() for k, v in state.items()}
    path = tmp_path / "gpt2.ckpt"
    torch.save(state, path)
    calls = count_profiles(monkeypatch)
    assert main([str(path)]) == 0
    rows = table_rows(capsys.readouterr().out)[2:]
    names = [r[0] for r in rows]
    assert names[0] == f"{prefix}transformer.wte (= {prefix}lm_head)"
    assert not any(name.startswith(f"{prefix}lm_head") for name in names)
    assert len(calls) == len(rows) == 6  # wte/lm_head once, wpe, c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert rows[0][1] == "300×16"
    expected = dense_angles(model.transformer.wte.weight.detach()).min()
    assert float(rows[0][2]) == pytest.approx(float(expected), rel=1e-3)  # printed to 4 digits


def test_merge_tied_keeps_distinct_tensors_apart() -> None:
    a = torch.randn(5, 3)
    merged = merge_tied({"a": a, "b": torch.randn(5, 3), "c": a, "d": a[:4], "e": a.clone()})
    assert list(merged) == ["a (= c, e)", "b", "d"]
    assert merged["d"].shape == (4, 3)


def test_huge_layer_is_sampled_and_the_table_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(300, 4, generator=g), torch.randn(10, 4, generator=g)
    path = tmp_path / "wide.pt"
    torch.save({"big.weight": big, "small.weight": small}, path)

    assert main([str(path), "--max-neurons", "50", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    header, *body = [r for i, r in enumerate(table_rows(out)) if i != 1]
    assert header[:4] == ["layer", "n×d", "neurons used", "min∠ (°)"]
    assert [r[:3] for r in body] == [["big", "300×4", "50 of 300"], ["small", "10×4", "all"]]
    drawn = dense_angles(big[sample_neuron_indices(300, 50, seed=1)])
    assert float(body[0][3]) == pytest.approx(float(drawn.min()), rel=1e-3)
    assert "min∠ is only an upper bound" in out

    assert main([str(path), "--max-neurons", "none"]) == 0
    out = capsys.readouterr().out
    header, _, first, _ = table_rows(out)
    assert "neurons used" not in header and "upper bound" not in out
    assert float(first[2]) == pytest.approx(float(dense_angles(big).min()), rel=1e-3)


def test_bad_max_neurons_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "x.pt"), "--max-neurons", "1"])
    assert exit_info.value.code == 2
    assert "--max-neurons" in capsys.readouterr().err
