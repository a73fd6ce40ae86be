"""The LIGHTNING_HSU_* environment switches: one reading rule, and a refusal that names the variable."""

from __future__ import annotations

import pytest

from lightning_hsu.functional import _switches
from lightning_hsu.functional._switches import SWITCHES, Switch, check_switches

NAMES = [switch.name for switch in SWITCHES]


def test_every_switch_of_the_package_is_checked() -> None:
    assert sorted(NAMES) == [
        "LIGHTNING_HSU_CPU_KERNEL",
        "LIGHTNING_HSU_ONEDNN_MATMUL",
        "LIGHTNING_HSU_PRODUCT_THREADS",
        "LIGHTNING_HSU_RUNNABLE_TASKS",
        "LIGHTNING_HSU_TRITON",
    ]


@pytest.mark.parametrize("switch", SWITCHES, ids=NAMES)
def test_unset_or_empty_means_the_default(switch: Switch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(switch.name, raising=False)
    assert switch.read() == switch.choices[0]
    monkeypatch.setenv(switch.name, "  ")
    assert switch.read() == switch.choices[0]


@pytest.mark.parametrize("switch", SWITCHES, ids=NAMES)
def test_each_choice_is_read_without_case_or_spaces(switch: Switch, monkeypatch: pytest.MonkeyPatch) -> None:
    for value in switch.choices:
        monkeypatch.setenv(switch.name, f" {value.upper()} ")
        assert switch.read() == value


@pytest.mark.parametrize("switch", SWITCHES, ids=NAMES)
def test_a_mistyped_value_is_refused_naming_the_variable_and_its_choices(
    switch: Switch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(switch.name, "off")
    expected = f"{switch.name}='off': choose one of {', '.join(switch.choices)}"
    with pytest.raises(ValueError, match=expected):
        switch.read()
    with pytest.raises(ValueError, match=expected):
        check_switches()


def test_the_triton_switch_refuses_what_it_used_to_take_silently_as_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LIGHTNING_HSU_TRITON=off`` once meant ``auto`` (the Triton kernel on), the opposite of what was asked."""
    import torch

    from lightning_hsu.functional import hyperspherical_energy

    monkeypatch.setenv(_switches.TRITON.name, "off")
    with pytest.raises(ValueError, match="LIGHTNING_HSU_TRITON='off'"):
        hyperspherical_energy(torch.randn(8, 3))
