"""Penalties replayed as CUDA graphs: the engine's bookkeeping (on the CPU, with the capture replaced
by an eager stand-in) and the real capture (GPU only)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning.pytorch as pl
import pytest
import torch
from models import TinyNet, assert_same_weights, mhe_reference, trainer_kwargs, weights

from lightning_hsu import (
    MGD,
    MHE,
    MHS,
    RMHP,
    CoMHE,
    HypersphericalUniformity,
    PenaltyEngine,
    Rule,
    Uniformity,
    cuda_graphs,
)
from lightning_hsu.cuda_graphs import GraphedPenalties, GraphReplay
from lightning_hsu.engine import NonFinitePenaltyError
from lightning_hsu.functional import hyperspherical_energy, neurons_of
from lightning_hsu.rules import preset_rules

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Captures:
    """Stands in for ``torch.cuda.make_graphed_callables``: records each capture, runs eagerly."""

    def __init__(self, fail: bool = False) -> None:
        self.weights: list[tuple[torch.Tensor, ...]] = []
        self.counts: list[list[int] | None] = []  # the layers per call, of each capture
        self.fail = fail

    def __call__(self, fn, sample_args):  # type: ignore[no-untyped-def]
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.weights.append(sample_args)
        return fn


#: The stand-in of the running test (set by the ``captures`` fixture): engines built by the helpers
#: below replay through it on the CPU.
_STAND_IN: Captures | None = None


@pytest.fixture
def captures(monkeypatch: pytest.MonkeyPatch) -> Iterator[Captures]:
    """The engines of this test capture CPU weights, through a :class:`Captures` that also notes
    the layers per call of each capture."""
    global _STAND_IN
    stand_in = _STAND_IN = Captures()

    def graphed(penalties, weights, counts=None, make_graphed=None):  # type: ignore[no-untyped-def]
        stand_in.counts.append(None if counts is None else list(counts))
        return GraphedPenalties(penalties, weights, counts=counts, make_graphed=make_graphed)

    monkeypatch.setattr(cuda_graphs, "GraphedPenalties", graphed)
    yield stand_in
    _STAND_IN = None


def _cpu_replay(engine: PenaltyEngine) -> PenaltyEngine:
    if _STAND_IN is not None:
        stand_in = _STAND_IN

        def recording(fn, sample_args):  # type: ignore[no-untyped-def]
            return stand_in(fn, sample_args)

        engine.graphs = GraphReplay(device_type="cpu", make_graphed=recording)
    return engine


def _step(engine: PenaltyEngine, model: torch.nn.Module, step: int) -> torch.Tensor | None:
    engine.begin_step(step)
    shape = (4, 12) if isinstance(model, Stack) else (4, 1, 6, 6)
    dtype = next(model.parameters()).dtype
    model(torch.randn(*shape, generator=torch.Generator().manual_seed(step), dtype=dtype))
    total = engine.collect()
    engine.end_step()
    return total


def _grad_of(total: torch.Tensor, model: TinyNet) -> dict[str, torch.Tensor]:
    model.zero_grad()
    total.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _untied_engine(model: TinyNet, rules=None, **kw) -> PenaltyEngine:  # type: ignore[no-untyped-def]
    """An engine on ``model`` as the callback sets it up with whole weights (penalties at collect)."""
    engine = _cpu_replay(PenaltyEngine(rules if rules is not None else preset_rules("mhe"), **kw))
    engine.tie_to_output = False
    engine.bind(model)
    engine.install_hooks()
    return engine


def _engines(model: TinyNet, **kw) -> tuple[PenaltyEngine, PenaltyEngine]:  # type: ignore[no-untyped-def]
    return _untied_engine(model, cuda_graphs=True, **kw), _untied_engine(model, cuda_graphs=False, **kw)


def _assert_graphed_step_equals_eager(
    graphed: PenaltyEngine, eager: PenaltyEngine, model: torch.nn.Module, step: int
) -> float:
    """One step with each engine alone: the same total, gradients and per-layer values; returns
    the total."""
    eager.enabled, graphed.enabled = False, True
    total = _step(graphed, model, step)
    assert total is not None
    got = (total.detach().clone(), _grad_of(total, model), graphed.last_values)
    eager.enabled, graphed.enabled = True, False
    total = _step(eager, model, step)
    assert total is not None
    torch.testing.assert_close(got[0], total.detach())
    want = _grad_of(total, model)
    assert got[1].keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[1][key], want[key])
    assert got[2].keys() == eager.last_values.keys()
    for key, value in eager.last_values.items():
        assert got[2][key] == pytest.approx(value, rel=1e-5), key
    return float(got[0])


def test_graphed_penalties_give_the_eager_values_gradients_and_logged_values(captures: Captures) -> None:
    model = TinyNet()
    graphed, eager = _engines(model, every_n_steps=2)
    for step in range(5):
        eager.enabled, graphed.enabled = False, True
        total = _step(graphed, model, step)
        if step % 2:  # lazy regularisation: nothing on odd steps
            assert total is None and _step(eager, model, step) is None
            continue
        assert total is not None
        got = (total.detach().clone(), _grad_of(total, model), graphed.last_values, graphed.last_weighted)
        eager.enabled, graphed.enabled = True, False
        total = _step(eager, model, step)
        assert total is not None
        want = (total.detach().clone(), _grad_of(total, model), eager.last_values, eager.last_weighted)
        torch.testing.assert_close(got[0], want[0])
        assert got[1].keys() == want[1].keys() == {"conv.weight", "hidden.weight", "fc.weight"}
        for key in got[1]:
            torch.testing.assert_close(got[1][key], want[1][key])
        assert got[2].keys() == want[2].keys() and got[3].keys() == want[3].keys()
        for key in got[2]:
            assert got[2][key] == pytest.approx(want[2][key], rel=1e-6)
            assert got[3][key] == pytest.approx(want[3][key], rel=1e-6)
    # the papers' preset on the three layers, once per active step (every_n_steps=2 skips the odd
    # steps), all from one capture of the three weights: of fresh leaves in their memory, since
    # the network's live graph holds the parameters' own gradient accumulators
    assert len(captures.weights) == 1 and graphed.graph_captures == 1
    params = (model.conv.weight, model.hidden.weight, model.fc.weight)
    for leaf, param in zip(captures.weights[0], params, strict=True):
        assert leaf is not param and leaf.is_leaf and leaf.requires_grad
        assert leaf.data_ptr() == param.data_ptr() and leaf.shape == param.shape
    assert graphed.last_weighted["fc/mhe_classifier"] == pytest.approx(
        20.0 * float(hyperspherical_energy(neurons_of(model.fc).detach())), rel=1e-6
    )


def test_coefficients_that_change_every_step_reach_the_graphed_penalties(captures: Captures) -> None:
    from lightning_hsu.schedules import LinearWarmup

    model = TinyNet()
    rules = [
        Rule(MHE(half_space=True), 2.0, layers=["conv", "hidden"], schedule=LinearWarmup(4, start_factor=0.25)),
        Rule(MHE(), 10.0, layers=["fc"]),
    ]
    engine = _untied_engine(model, rules)
    for step in range(6):
        total = _step(engine, model, step)
        assert total is not None
        ramp = 2.0 * min(1.0, 0.25 + 0.75 * step / 4)
        hidden = sum(hyperspherical_energy(neurons_of(m), half_space=True) for m in (model.conv, model.hidden))
        torch.testing.assert_close(total, ramp * hidden + 10.0 * hyperspherical_energy(neurons_of(model.fc)))
    assert engine.graph_captures == 1  # the coefficients are an input of the replay, not of the capture


def test_comhe_projections_drawn_for_each_step_reach_the_graphed_penalties(captures: Captures) -> None:
    # float64: eager CoMHE takes the closed-form half-space term, the graph the two kernel terms,
    # and in float32 near-collinear neurons of a 3-d projection part them by ~1e-4
    model = TinyNet().double()
    rules = [
        Rule(CoMHE(projection_dim=3, projections=4, half_space=True), 2.0, layers=["conv", "hidden"]),
        Rule(CoMHE(projection_dim=2, projections=2), 10.0, layers=["fc"]),
    ]
    graphed, eager = _engines(model, rules=rules)
    totals = [_assert_graphed_step_equals_eager(graphed, eager, model, step) for step in range(4)]
    # the weights never changed: the steps differ by their projections alone, drawn anew into
    # the buffer that the one capture reads
    assert len(set(totals)) == 4
    assert len(captures.weights) == 1 and graphed.graph_captures == 1


@pytest.mark.parametrize(
    "regularizer",
    [MHS(half_space=True), MHS(temperature=0.1), RMHP()],
    ids=["hard-mhs", "soft-mhs", "rmhp"],
)
def test_separation_and_polarization_are_graphed_with_the_eager_values(captures: Captures, regularizer) -> None:
    model = TinyNet()
    rules = [Rule(regularizer, 3.0, layers=["conv", "hidden", "fc"])]
    graphed, eager = _engines(model, rules=rules)
    for step in range(2):
        _assert_graphed_step_equals_eager(graphed, eager, model, step)
        with torch.no_grad():  # an optimizer's in-place step: the same capture reads the new values
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
    assert len(captures.weights) == 1 and len(captures.weights[0]) == 3


class Stack(torch.nn.Module):
    """Three hidden layers of one shape, one of another, a classifier: a ResNet stage in small."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(12, 12) for _ in range(3))
        self.wide = torch.nn.Linear(12, 20)
        self.fc = torch.nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.fc(torch.tanh(self.wide(x)))


def test_layers_of_one_shape_share_one_batched_call_in_the_graphs(captures: Captures) -> None:
    model = Stack()
    rules = [
        Rule(MHE(half_space=True), 1.0, layers=["blocks.0", "blocks.1", "wide"]),
        Rule(MHE(power=1.0, half_space=True), 2.0, layers=["blocks.2"]),  # same shape, other hparams
        Rule(MHE(), 10.0, layers=["fc"]),
    ]
    graphed, eager = _engines(model, rules=rules, classifier=None)
    eager.enabled = False
    total = _step(graphed, model, 0)
    assert total is not None
    got = _grad_of(total, model), graphed.last_values
    # blocks.0 and blocks.1 in one call; blocks.2 (another power), wide and fc (other shapes) alone
    assert captures.counts == [[2, 1, 1, 1]]
    # the sum written out per layer from the formula's own function, not from the engine
    model.zero_grad()
    blocks = [neurons_of(b) for b in model.blocks]
    ref = (
        hyperspherical_energy(blocks[0], half_space=True)
        + hyperspherical_energy(blocks[1], half_space=True)
        + 2.0 * hyperspherical_energy(blocks[2], power=1.0, half_space=True)
        + hyperspherical_energy(neurons_of(model.wide), half_space=True)
        + 10.0 * hyperspherical_energy(neurons_of(model.fc))
    )
    torch.testing.assert_close(total.detach(), ref.detach())
    want = _grad_of(ref, model)
    assert got[0].keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[0][key], want[key])
    graphed.enabled, eager.enabled = False, True
    _step(eager, model, 0)
    assert got[1].keys() == eager.last_values.keys()
    for key, value in eager.last_values.items():
        assert got[1][key] == pytest.approx(value, rel=1e-6), key
    # the grouping is kept, and each grouping is a capture of its own (a benchmark alternates them)
    graphed.enabled, eager.enabled = True, False
    _step(graphed, model, 1)
    graphed.graphs.batch = False
    unbatched = _step(graphed, model, 2)
    graphed.graphs.batch = True
    batched = _step(graphed, model, 3)
    assert captures.counts == [[2, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert unbatched is not None and batched is not None
    torch.testing.assert_close(batched, unbatched)


@pytest.mark.parametrize(
    "regularizer",
    [MHS(half_space=True), MHS(temperature=0.1), Uniformity(), RMHP(), CoMHE(projection_dim=4, projections=3)],
    ids=["hard-mhs", "soft-mhs", "uniformity", "rmhp", "comhe"],
)
def test_other_batchable_regularizers_share_one_call_with_the_eager_values(captures: Captures, regularizer) -> None:
    model = Stack()
    rules = [Rule(regularizer, 3.0, layers=["blocks.*"])]
    graphed, eager = _engines(model, rules=rules, classifier=None)
    for step in range(2):
        _assert_graphed_step_equals_eager(graphed, eager, model, step)
        with torch.no_grad():  # an optimizer's step
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
    assert captures.counts == [[3]]  # the three blocks in one call, captured once


def test_graphed_penalties_check_the_group_sizes() -> None:
    w = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    with pytest.raises(ValueError, match=r"counts \[2, 2\] and 3 weights"):
        GraphedPenalties([MHE().graph_penalty] * 2, w, counts=[2, 2], make_graphed=lambda fn, args: fn)
    with pytest.raises(ValueError, match="got 2 penalties, counts \\[1, 1\\] and 3 weights"):
        GraphedPenalties([MHE().graph_penalty] * 2, w, make_graphed=lambda fn, args: fn)


def test_a_weight_moved_to_new_memory_is_captured_again(captures: Captures) -> None:
    model = TinyNet()
    graphed, eager = _engines(model)
    eager.enabled = False
    _step(graphed, model, 0)
    model.hidden.weight.data = model.hidden.weight.data.clone()  # new storage: the old capture reads stale memory
    _step(graphed, model, 1)
    assert len(captures.weights) == 2
    _step(graphed, model, 2)  # in-place updates (an optimizer's) need no new capture
    with torch.no_grad():
        model.hidden.weight.mul_(2.0)
    _step(graphed, model, 3)
    assert len(captures.weights) == 2


def test_only_capturable_regularizers_of_plain_weights_are_captured(captures: Captures) -> None:
    model = TinyNet()
    torch.nn.utils.parametrizations.weight_norm(model.conv)
    rules = [Rule(MHE(half_space=True), layers=["conv", "hidden"]), Rule(MGD(), layers=["fc"])]
    engine = _untied_engine(model, rules)
    total = _step(engine, model, 0)
    assert total is not None
    # MGD is not capturable (its Cholesky factorisation checks positive definiteness on the host),
    # the conv is parametrized
    assert [[w.data_ptr() for w in c] for c in captures.weights] == [[model.hidden.weight.data_ptr()]]
    assert set(engine.last_values) == {"conv/mhe", "hidden/mhe", "fc/mgd"}
    ref = (
        hyperspherical_energy(neurons_of(model.conv), half_space=True)
        + hyperspherical_energy(neurons_of(model.hidden), half_space=True)
        + MGD()(neurons_of(model.fc))
    )
    torch.testing.assert_close(total, ref)


@pytest.mark.parametrize("options", [dict(on_nonfinite="skip"), dict(cuda_graphs=False)])
def test_no_capture_when_skipping_non_finite_penalties_or_switched_off(captures: Captures, options) -> None:
    model = TinyNet()
    engine = _untied_engine(model, **options)
    _step(engine, model, 0)
    assert captures.weights == []


def test_a_failed_capture_warns_and_computes_eagerly_from_then_on(captures: Captures) -> None:
    captures.fail = True
    model = TinyNet()
    graphed, eager = _engines(model)
    eager.enabled = False
    with pytest.warns(RuntimeWarning, match="capturing the hyperspherical penalties in a CUDA graph failed"):
        total = _step(graphed, model, 0)
    assert graphed.cuda_graphs is False and total is not None
    torch.testing.assert_close(total, mhe_reference()(model))


def test_cuda_graphs_option_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="`cuda_graphs` must be true or false"):
        HypersphericalUniformity(preset="mhe", cuda_graphs="yes")  # type: ignore[arg-type]


# -- on a GPU -------------------------------------------------------------------------------------
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(), dict(chunk_size=64), dict(chunk_size=64, shard=(0, 2))])
def test_unchecked_energy_makes_no_host_sync_on_cuda(options) -> None:
    w = torch.randn(300, 40, device="cuda", requires_grad=True)
    _backward_raising_on_host_sync(lambda: hyperspherical_energy(w, half_space=True, check_finite=False, **options))


def _backward_raising_on_host_sync(penalty) -> None:  # type: ignore[no-untyped-def]
    """Forward and backward of ``penalty()`` with CUDA's sync debug mode set to raise."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        penalty().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.gpu
def test_graphed_comhe_replays_each_steps_projections_on_cuda() -> None:
    torch.manual_seed(0)
    ws = [torch.randn(n, d, device="cuda", requires_grad=True) for n, d in ((64, 27), (128, 576))]
    comhes = [CoMHE(half_space=True).spawn(f"layer{i}") for i in range(2)]
    for comhe, w in zip(comhes, ws, strict=True):
        comhe.refresh_graph_inputs(w.detach(), step=0)
    graphs = GraphedPenalties([c.graph_penalty for c in comhes], ws)
    for step in range(3):
        for comhe, w in zip(comhes, ws, strict=True):
            comhe.refresh_graph_inputs(w.detach(), step=step)
        values = graphs()
        grads = torch.autograd.grad(values.sum(), ws)
        for comhe, w, v, g in zip(comhes, ws, values, grads, strict=True):
            x = w.detach().clone().requires_grad_()
            ref = comhe(x, step=step)
            torch.testing.assert_close(v, ref.detach())
            torch.testing.assert_close(g, torch.autograd.grad(ref, x)[0])


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "regularizer",
    [MHS(half_space=True), MHS(temperature=0.1), RMHP(), CoMHE(half_space=True)],
    ids=["hard-mhs", "soft-mhs", "rmhp", "comhe"],
)
def test_capturable_regularizers_make_no_host_sync_on_cuda(regularizer) -> None:
    w = torch.randn(300, 40, device="cuda", requires_grad=True)
    regularizer.refresh_graph_inputs(w.detach(), step=0)
    _backward_raising_on_host_sync(lambda: regularizer.graph_penalty(w))
    if regularizer.batchable:  # layers of one shape in one call
        stacked = torch.randn(3, 300, 40, device="cuda", requires_grad=True)
        members = [regularizer] * 3
        _backward_raising_on_host_sync(lambda: regularizer.graph_penalties(stacked, members).sum())


@cuda
@pytest.mark.gpu
def test_a_batched_group_replays_the_per_layer_values_and_gradients_on_cuda() -> None:
    torch.manual_seed(0)
    ws = [torch.randn(128, 576, device="cuda", requires_grad=True) for _ in range(3)]
    ws.append(torch.randn(64, 27, device="cuda", requires_grad=True))
    mhe = MHE(half_space=True)
    graphs = GraphedPenalties(
        [lambda *group: mhe.graph_penalty(torch.stack(group)), mhe.graph_penalty], ws, counts=[3, 1]
    )
    _assert_replays_give_half_space_mhe_after_in_place_updates(graphs, ws, rounds=2)


def _assert_replays_give_half_space_mhe_after_in_place_updates(graphs, ws, rounds: int) -> None:  # type: ignore[no-untyped-def]
    """Each replay's values and gradients (of 3 × their sum) are half-space MHE's, computed eagerly
    per weight; between replays the weights move in place, as an optimizer moves them."""
    for _ in range(rounds):
        values = graphs()
        grads = torch.autograd.grad(values.sum() * 3.0, ws)
        for w, v, g in zip(ws, values, grads, strict=True):
            x = w.detach().clone().requires_grad_()
            ref = hyperspherical_energy(x, half_space=True)
            torch.testing.assert_close(v, ref.detach())
            torch.testing.assert_close(g, torch.autograd.grad(ref * 3.0, x)[0])
        with torch.no_grad():
            for w in ws:
                w.add_(torch.randn_like(w), alpha=0.3)


@cuda
@pytest.mark.gpu
def test_graph_replay_follows_in_place_updates_of_the_weights() -> None:
    torch.manual_seed(0)
    ws = [torch.randn(n, d, device="cuda", requires_grad=True) for n, d in ((64, 27), (128, 576), (10, 512))]
    mhe = MHE(half_space=True)
    graphs = GraphedPenalties([lambda w: mhe(w, check_finite=False)] * 3, ws)
    _assert_replays_give_half_space_mhe_after_in_place_updates(graphs, ws, rounds=3)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_callback_with_cuda_graphs_trains_like_the_hand_written_penalty(tmp_path, precision: str) -> None:
    ref = TinyNet(penalty=mhe_reference())
    pl.Trainer(**trainer_kwargs(tmp_path, accelerator="gpu", precision=precision, deterministic=False)).fit(ref)
    model = TinyNet()
    callback = HypersphericalUniformity(preset="mhe")
    kw = trainer_kwargs(tmp_path, accelerator="gpu", precision=precision, deterministic=False)
    pl.Trainer(callbacks=[callback], **kw).fit(model)
    # one capture of the three layers inside the first training step, replayed in all four (a
    # failed capture would have switched cuda_graphs off and trained eagerly, to the same weights)
    assert callback.engine.cuda_graphs and callback.engine.graph_captures == 1
    assert_same_weights(weights(model), weights(ref))


@cuda
@pytest.mark.gpu
def test_nan_weights_under_cuda_graphs_raise_naming_the_layer(tmp_path) -> None:
    model = TinyNet()
    with torch.no_grad():
        model.hidden.weight[0, 0] = math.nan
    callback = HypersphericalUniformity(preset="mhe")
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, accelerator="gpu", deterministic=False))
    with pytest.raises(NonFinitePenaltyError, match="weights of layer 'hidden' contain NaN or inf at global step 0"):
        trainer.fit(model)


@cuda
@pytest.mark.gpu
def test_the_deferred_check_on_cuda_waits_for_the_penalties_not_for_the_work_queued_after_them() -> None:
    model = TinyNet().cuda()
    engine = _untied_engine(model)
    engine.defer_finite_check = True
    x = torch.randn(4, 1, 6, 6, device="cuda")
    for step in range(3):  # the capture, then replays; at step 2 a NaN weight
        if step == 2:
            with torch.no_grad():
                model.hidden.weight[0, 0] = math.nan
        engine.begin_step(step)
        model(x)
        total = engine.collect()
        engine.end_step()
        assert total is not None
        total.backward()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued after the step (a long backward)
        if step < 2:
            engine.check_finite_pending()
            assert not torch.cuda.current_stream().query()  # it returned with that work still queued
        else:
            with pytest.raises(NonFinitePenaltyError, match="layer 'hidden' contain NaN or inf at global step 2"):
                engine.check_finite_pending()
        torch.cuda.synchronize()


# -- the step's one NaN check, deferred to the optimizer step (as on a GPU) --------------------------
def test_a_graphed_step_makes_no_host_sync_until_the_deferred_check(captures: Captures) -> None:
    from tests.functional.test_unchecked import HostSyncCounter

    model = TinyNet()
    graphed, eager = _engines(model)
    eager.enabled = False
    graphed.defer_finite_check = True
    _step(graphed, model, 0)  # the capture
    graphed.check_finite_pending()  # the optimizer step
    factors = graphed.graphs._factors[next(iter(graphed.graphs._factors))][1]
    with HostSyncCounter() as counter:
        total = _step(graphed, model, 1)
        total = _step(graphed, model, 1)  # a second micro-batch of the same optimizer step
    assert total is not None and counter.syncs == []
    assert graphed.graphs._factors[next(iter(graphed.graphs._factors))][1] is factors  # not copied again
    with HostSyncCounter() as counter:
        graphed.check_finite_pending()
    assert counter.syncs == ["_local_scalar_dense"]  # one for both micro-batches' values


def test_deferred_check_raises_naming_the_layer_and_step_of_the_nan(captures: Captures) -> None:
    model = TinyNet()
    engine = _untied_engine(model)
    engine.defer_finite_check = True
    _step(engine, model, 0)
    with torch.no_grad():
        model.fc.weight[1, 1] = math.inf
    total = _step(engine, model, 1)  # computed, not checked yet
    assert total is not None and not math.isfinite(float(total))
    with pytest.raises(NonFinitePenaltyError, match="weights of layer 'fc' contain NaN or inf at global step 1"):
        engine.check_finite_pending()
    engine.check_finite_pending()  # reported once


def test_values_left_unchecked_by_an_earlier_step_are_checked_when_the_next_one_begins(captures: Captures) -> None:
    model = TinyNet()
    engine = _untied_engine(model)
    engine.defer_finite_check = True
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = math.nan
    _step(engine, model, 4)
    _step(engine, model, 4)  # a second micro-batch of the same optimizer step: still deferred
    with pytest.raises(NonFinitePenaltyError, match="layer 'conv' contain NaN or inf at global step 4"):
        engine.begin_step(5)  # nobody called check_finite_pending before the optimizer stepped


def test_with_the_deferred_check_a_nan_penalty_never_reaches_the_weights(tmp_path, captures: Captures) -> None:
    class DeferredCheck(HypersphericalUniformity):  # the callback's check on a GPU, here on the CPU
        def on_fit_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            super().on_fit_start(trainer, pl_module)
            self.engine.defer_finite_check = True

    model = TinyNet()
    with torch.no_grad():
        model.hidden.weight[2, 3] = math.nan
    before = weights(model)
    trainer = pl.Trainer(callbacks=[DeferredCheck(preset="mhe")], **trainer_kwargs(tmp_path))
    with pytest.raises(NonFinitePenaltyError, match="weights of layer 'hidden' contain NaN or inf at global step 0"):
        trainer.fit(model)
    after = weights(model)
    for key in before:  # the optimizer never stepped
        torch.testing.assert_close(after[key], before[key], equal_nan=True)


@cuda
@pytest.mark.gpu
def test_comhe_draws_its_projections_on_the_gpu_the_same_for_the_same_step() -> None:
    from lightning_hsu import CoMHE

    a, b = CoMHE().spawn("layer"), CoMHE().spawn("layer")
    first = a.projection_matrices(64, 7, torch.device("cuda"))
    assert first.is_cuda and first.shape == (20, 40, 64)
    torch.testing.assert_close(first, b.projection_matrices(64, 7, torch.device("cuda")), rtol=0, atol=0)
    assert not torch.equal(first, a.projection_matrices(64, 8, torch.device("cuda")))
