"""When the engine computes penalties: after the forward pass for whole weights, inside it when tied."""

from __future__ import annotations

import pytest
import torch
from models import TinyNet

from lightning_hsu import MHE, PenaltyEngine, Rule
from lightning_hsu.functional import hyperspherical_energy, neurons_of


def _order_recording_mhe(forwards: list[str], calls: list[int]) -> MHE:
    """MHE that notes, at each call, how many layers of the model had run their forward.

    The lists live in the class: the engine copies regularizer objects per layer.
    """

    class OrderRecordingMHE(MHE):
        def penalty(self, neurons, *, step=None):
            calls.append(len(forwards))
            return super().penalty(neurons, step=step)

    return OrderRecordingMHE(half_space=True)


def _engine_on(model: TinyNet, tie: bool) -> tuple[PenaltyEngine, list[str], list[int]]:
    forwards: list[str] = []
    calls: list[int] = []
    for name in ("conv", "hidden", "fc"):
        # appended after ours: the engine's hooks are prepended
        getattr(model, name).register_forward_hook(lambda *_, name=name: forwards.append(name))
    engine = PenaltyEngine([Rule(_order_recording_mhe(forwards, calls), layers=["hidden"])])
    engine.tie_to_output = tie
    engine.bind(model)
    engine.install_hooks()
    return engine, forwards, calls


@pytest.mark.parametrize("tie", [False, True])
def test_penalty_is_computed_after_the_forward_unless_tied_to_the_layer_output(tie: bool) -> None:
    model = TinyNet()
    engine, forwards, calls = _engine_on(model, tie)
    engine.begin_step(0)
    out = model(torch.randn(4, 1, 6, 6))
    assert forwards == ["conv", "hidden", "fc"]
    # tied: inside the hidden layer's forward, after conv; untied: not yet
    assert calls == ([1] if tie else [])
    penalty = engine.collect()
    assert calls == ([1] if tie else [3])  # untied: when the loss is collected
    engine.end_step()
    assert penalty is not None
    expected = hyperspherical_energy(neurons_of(model.hidden), half_space=True)
    torch.testing.assert_close(penalty.detach(), expected.detach())
    (out.sum() + penalty).backward()  # the untied penalty reaches the weights all the same
    assert model.hidden.weight.grad is not None


def test_untied_penalty_covers_a_layer_run_without_autograd_or_not_run() -> None:
    """Whole weights: a selected layer is penalised every step, also when its forward ran under
    no_grad (reentrant activation checkpointing) or not at all (a weight read outside forward)."""
    model = TinyNet()
    engine, _, calls = _engine_on(model, tie=False)
    expected = hyperspherical_energy(neurons_of(model.hidden), half_space=True)
    for step, run in enumerate(("no_grad", "not run")):
        engine.begin_step(step)
        if run == "no_grad":
            with torch.no_grad():
                model(torch.randn(4, 1, 6, 6))
        penalty = engine.collect()
        engine.end_step()
        assert penalty is not None and penalty.requires_grad
        torch.testing.assert_close(penalty.detach(), expected.detach())
    assert len(calls) == 2


def test_tied_penalty_of_a_layer_run_without_autograd_is_reported_after_the_first_step() -> None:
    model = TinyNet()
    engine, _, calls = _engine_on(model, tie=True)
    engine.begin_step(0)
    with torch.no_grad():
        model(torch.randn(4, 1, 6, 6))
    assert engine.collect() is None and calls == []
    with pytest.warns(RuntimeWarning, match="hidden: its forward ran with autograd off"):
        engine.end_step()
