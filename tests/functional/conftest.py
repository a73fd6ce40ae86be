"""Fixtures shared by the functional tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Two intra-op threads whatever the machine's default, so that the pool's narrowing happens."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["onednn", "torch.bmm"])
def product_library(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The float32 CPU products through oneDNN, then through ``torch.bmm``, whatever this CPU's default."""
    from lightning_hsu.functional import _matmul

    if request.param == "onednn" and _matmul.onednn_operator() is None:
        pytest.skip("this PyTorch has no oneDNN float32 matmul")
    chosen = _matmul._onednn_linear  # a test may monkeypatch the name
    monkeypatch.setenv(_matmul.ONEDNN_ENV, "1" if request.param == "onednn" else "0")
    chosen.cache_clear()
    yield request.param
    chosen.cache_clear()  # the next call reads the restored environment
