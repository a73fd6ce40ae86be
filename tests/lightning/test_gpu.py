"""CUDA runs of the callback (skipped without a GPU; the full matrix is tests/lightning/gpu_checks.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SCRIPT = Path(__file__).parent / "gpu_checks.py"


@pytest.mark.parametrize("check", ["single-fp32", "single-fp16-mixed (GradScaler)", "fsdp1 (1 process)"])
def test_callback_on_cuda_trains_like_hand_written_penalty(check, tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", check, "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in out.read_text().splitlines() if line.startswith(f"| {check} |")]
    assert row and "| pass |" in row[0], out.read_text()
