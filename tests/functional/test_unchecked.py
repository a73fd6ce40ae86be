"""``check_finite=False``: the same energy with no host sync (CUDA-graph safe), NaN for NaN/inf neurons."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_hsu import MHE
from lightning_hsu.functional import NonFiniteInputError, hyperspherical_energy

#: ATen ops that copy a device value to the host (``.item()``, ``bool(tensor)``) or whose output
#: size depends on the data: on a GPU each waits for the queue, and none may run in a CUDA graph.
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}


class HostSyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in HOST_SYNC_OPS:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _energy_and_grad(w: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    x = w.clone().requires_grad_()
    value = hyperspherical_energy(x, **kw)
    value.backward()
    assert x.grad is not None
    return value.detach(), x.grad


# one block, upper strips, a shard's full rows, a single neuron
SCHEDULES = [
    pytest.param(dict(), 40, id="one-block"),
    pytest.param(dict(chunk_size=16), 40, id="strips"),
    pytest.param(dict(chunk_size=16, shard=(1, 3)), 40, id="shard"),
    pytest.param(dict(), 1, id="one-neuron"),
]


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize(("options", "n"), SCHEDULES)
def test_unchecked_energy_makes_no_host_sync_and_equals_the_checked_one(options, n: int, half_space: bool) -> None:
    w = torch.randn(n, 24, generator=torch.Generator().manual_seed(0))
    # the compiled CPU kernel checks a probe block on the host at its first use in a process: not counted here
    _energy_and_grad(w, half_space=half_space, check_finite=False, **options)
    with HostSyncCounter() as counter:
        value, grad = _energy_and_grad(w, half_space=half_space, check_finite=False, **options)
    assert counter.syncs == []
    with HostSyncCounter() as counter:
        ref_value, ref_grad = _energy_and_grad(w, half_space=half_space, **options)
    assert counter.syncs  # the checked path's check, for contrast
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_unchecked_energy_rescales_huge_rows_like_the_checked_one() -> None:
    # rows of norm ~1e30: their squares overflow float32 unless divided first
    w = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    w[3] *= 1e30
    ref_value, ref_grad = _energy_and_grad(w, half_space=True)  # the checked path rescales that row too
    value, grad = _energy_and_grad(w, half_space=True, check_finite=False)
    assert math.isfinite(float(value)) and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)
    exact = _energy_and_grad(w.double(), half_space=True)[0]
    torch.testing.assert_close(value.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("options", "n"), SCHEDULES)
def test_unchecked_energy_of_non_finite_neurons_is_nan_instead_of_an_error(options, n: int, bad: float) -> None:
    w = torch.randn(n, 24, generator=torch.Generator().manual_seed(2))
    w[0, 5] = bad
    with pytest.raises(NonFiniteInputError):
        hyperspherical_energy(w, **options)
    value = hyperspherical_energy(w, check_finite=False, **options)
    assert math.isnan(float(value))


def test_only_regularizers_that_declare_it_skip_the_check() -> None:
    class LoggingMHE(MHE):  # overrides penalty: may sync or keep state, so not capturable by inheritance
        def penalty(self, neurons, *, step=None):  # type: ignore[no-untyped-def]
            return super().penalty(neurons, step=step)

    assert MHE.capturable and not LoggingMHE.capturable
    w = torch.randn(6, 4)
    assert math.isnan(float(MHE()(w.fill_(math.nan), check_finite=False)))
    with pytest.raises(ValueError, match="LoggingMHE always checks its input"):
        LoggingMHE()(w, check_finite=False)


@pytest.mark.parametrize("name", ["MHP", "MHC"])
def test_the_poles_inner_steps_make_no_host_sync(name: str) -> None:
    import lightning_hsu

    def syncs(inner_steps: int) -> int:
        regularizer = getattr(lightning_hsu, name)(inner_steps=inner_steps).spawn("layer")
        w = torch.randn(16, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
        with HostSyncCounter() as counter:
            regularizer(w, step=0).backward()
        return len(counter.syncs)

    # the neurons are checked and normalised once per training step, however many pole steps
    assert syncs(1) == syncs(10) <= 5


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_unchecked_uniformity_makes_no_host_sync_and_equals_the_checked_one(half_space: bool, chunk_size) -> None:
    from lightning_hsu.functional import uniformity

    w = torch.randn(30, 12, generator=torch.Generator().manual_seed(4))

    def value_and_grad(**kw):  # type: ignore[no-untyped-def]
        x = w.clone().requires_grad_()
        value = uniformity(x, t=2.0, half_space=half_space, chunk_size=chunk_size, **kw)
        value.backward()
        return value.detach(), x.grad

    with HostSyncCounter() as counter:
        value, grad = value_and_grad(check_finite=False)
    assert counter.syncs == []
    ref_value, ref_grad = value_and_grad()
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)
    w[3, 3] = math.inf
    assert math.isnan(float(uniformity(w, check_finite=False)))
    with pytest.raises(NonFiniteInputError):
        uniformity(w)


@pytest.mark.parametrize("half_space", [False, True])
def test_comhe_graph_penalty_reads_the_refreshed_projections_with_no_host_sync(half_space: bool) -> None:
    from lightning_hsu import CoMHE

    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(5))
    comhe = CoMHE(projection_dim=4, projections=3, half_space=half_space).spawn("layer")
    for step in (0, 1, 7):
        x = w.clone().requires_grad_()
        with HostSyncCounter() as counter:
            comhe.refresh_graph_inputs(x.detach(), step=step)
            value = comhe.graph_penalty(x)
            value.backward()
        assert counter.syncs == []
        # the checked eager penalty of the same step: the same draw, the same value and gradient
        y = w.clone().requires_grad_()
        ref = comhe(y, step=step)
        ref.backward()
        torch.testing.assert_close(value, ref)
        torch.testing.assert_close(x.grad, y.grad)
    w[2, 2] = math.nan
    assert math.isnan(float(comhe(w, step=0, check_finite=False)))
    with pytest.raises(NonFiniteInputError):
        comhe(w, step=0)


def test_comhe_graph_penalty_before_any_refresh_is_an_error() -> None:
    from lightning_hsu import CoMHE

    with pytest.raises(RuntimeError, match="call it first"):
        CoMHE().graph_penalty(torch.randn(5, 6))


def _value_and_grad(fn, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    x = w.clone().requires_grad_()
    value = fn(x)
    value.backward()
    assert x.grad is not None
    return value.detach(), x.grad


#: A regular tetrahedron (rows of equal norm, so that the normaliser's eps keeps the ties).
TETRAHEDRON = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize(
    ("w", "options"),
    [
        pytest.param(torch.randn(30, 6, generator=torch.Generator().manual_seed(6)), dict(), id="one-block"),
        pytest.param(torch.randn(30, 6, generator=torch.Generator().manual_seed(6)), dict(chunk_size=7), id="strips"),
        pytest.param(TETRAHEDRON, dict(), id="tetrahedron-6-ties"),
        pytest.param(torch.randn(1, 6, generator=torch.Generator().manual_seed(6)), dict(), id="one-neuron"),
    ],
)
@pytest.mark.parametrize("temperature", [None, 0.1])
def test_unchecked_mhs_makes_no_host_sync_and_equals_the_checked_one(w, options, half_space: bool, temperature) -> None:
    from lightning_hsu import MHS

    mhs = MHS(half_space=half_space, temperature=temperature, **options)
    with HostSyncCounter() as counter:
        value, grad = _value_and_grad(lambda x: mhs(x, check_finite=False), w)
    assert counter.syncs == []
    ref_value, ref_grad = _value_and_grad(mhs, w)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)
    if temperature is None and w is TETRAHEDRON:
        # all 6 pairs tie at d^2 = 8/3; in half space the 12 pairs (i, -j) tie at 4/3, each twice
        assert float(value) == pytest.approx(-6 * 8 / 3 if not half_space else -12 * 4 / 3, rel=1e-3)
    bad = w.clone()
    bad[0, 0] = math.inf
    assert math.isnan(float(mhs(bad, check_finite=False)))
    with pytest.raises(NonFiniteInputError):
        mhs(bad)


def test_unchecked_relaxed_polarization_makes_no_host_sync() -> None:
    from lightning_hsu import RMHP

    w = torch.randn(9, 5, generator=torch.Generator().manual_seed(7))
    with HostSyncCounter() as counter:
        value, grad = _value_and_grad(lambda x: RMHP()(x, check_finite=False), w)
    assert counter.syncs == []
    ref_value, ref_grad = _value_and_grad(RMHP(), w)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)
    w[2, 2] = math.nan
    assert math.isnan(float(RMHP()(w, check_finite=False)))


def _batchable_regularizers():  # type: ignore[no-untyped-def]
    from lightning_hsu import MHS, RMHP, CoMHE, Uniformity

    return [
        pytest.param(MHE(), id="mhe"),
        pytest.param(MHE(half_space=True, power=0.0), id="mhe-half-log"),
        pytest.param(MHS(), id="hard-mhs"),
        pytest.param(MHS(half_space=True), id="hard-mhs-half"),
        pytest.param(MHS(half_space=True, temperature=0.1), id="soft-mhs-half"),
        pytest.param(Uniformity(), id="uniformity"),
        pytest.param(Uniformity(half_space=True, t=3.0), id="uniformity-half"),
        pytest.param(RMHP(), id="rmhp"),
        pytest.param(CoMHE(projection_dim=2, projections=3, half_space=True), id="comhe-half"),
    ]


def test_the_batchable_regularizers_are_those_tested_batched() -> None:
    from lightning_hsu.regularizers.registry import REGULARIZERS

    batchable = {name for name, cls in REGULARIZERS.items() if cls.batchable}
    assert batchable == {"mhe", "mhs", "uniformity", "rmhp", "comhe"}
    from lightning_hsu.regularizers import Capturable

    capturable = {name for name, cls in REGULARIZERS.items() if issubclass(cls, Capturable)}
    assert capturable == batchable  # MGD, MHP and MHC lack the capability altogether
    assert not hasattr(REGULARIZERS["mgd"](), "graph_penalties")


@pytest.mark.parametrize("regularizer", _batchable_regularizers())
def test_a_batchable_graph_penalty_gives_each_slice_its_own_penalty_with_no_host_sync(regularizer) -> None:
    # what a CUDA graph runs for layers of one shape (GraphReplay.batch): a tetrahedron
    # (ties: each slice needs its own tie threshold, shift) beside random neurons at another scale
    generator = torch.Generator().manual_seed(4)
    random = torch.randn(2, 4, 3, generator=generator)
    # float64: the checked penalty may take other formulas (the closed-form half-space term), and
    # CoMHE's 2-d projections are ill-conditioned enough to part float32 results by ~1e-4
    w = torch.stack([TETRAHEDRON, random[0], 30.0 * random[1]]).double()
    members = [regularizer.spawn(f"layer{i}") for i in range(3)]  # one per layer (CoMHE: its own projections)
    for member, slice_ in zip(members, w, strict=True):
        member.refresh_graph_inputs(slice_, step=5)
    x = w.clone().requires_grad_()
    with HostSyncCounter() as counter:
        values = members[0].graph_penalties(x, members)
        (values * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert counter.syncs == [] and values.shape == (3,)
    for i, (value, slice_) in enumerate(zip(values, w, strict=True)):
        # the checked penalty of that layer at that step
        ref_value, ref_grad = _value_and_grad(lambda y, k=i + 1: members[k - 1](y, step=5) * k, slice_)
        torch.testing.assert_close(value * (i + 1), ref_value)
        torch.testing.assert_close(x.grad[i], ref_grad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_finite_check_finds_one_bad_entry_and_accepts_finite_entries_whose_sum_overflows(bad: float) -> None:
    from lightning_hsu.functional._common import check_finite_neurons

    big = torch.full((4, 3), 3e38)  # finite, but their float32 sum is inf
    check_finite_neurons(big)
    for position in [(0, 0), (3, 2)]:
        w = torch.randn(4, 3)
        w[position] = bad
        with pytest.raises(NonFiniteInputError, match="contain NaN or inf"):
            check_finite_neurons(w)
    mixed = torch.tensor([[math.inf, -math.inf], [1.0, 2.0]])  # an inf - inf sum is NaN: still caught
    with pytest.raises(NonFiniteInputError):
        check_finite_neurons(mixed)
