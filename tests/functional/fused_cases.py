"""Parity cases of the fused pair-sum kernels: the C kernel on the CPU (``functional/_cpu_pairs.py``) and
the Triton kernel in Triton's interpreter (``functional/_triton_pairs.py``).

Not collected by pytest on its own (no ``test_`` prefix): ``test_cpu_pairs.py`` and
``test_triton_pairs.py`` run this file in a fresh process with ``LIGHTNING_HSU_FUSED_CASES`` naming
the kernel. For Triton also with ``TRITON_INTERPRET=1``, which Triton reads when it is imported and
when a kernel is decorated (this suite's other tests import Triton through ``torch._dynamo`` first),
and ``LIGHTNING_HSU_TRITON=always``, which lets CPU tensors take it. Every case is compared with the
eager path (the same float32 cosines, so a few ulps apart) and with the float64 statement of the
formula in ``reference.py``: the sum over the unordered pairs of the vectors (``[W; -W]`` in half
space) of the clamped kernel, differentiated by autograd.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable

import pytest
import torch

from lightning_hsu.functional import (
    compressive_energy,
    hyperspherical_energy,
    hyperspherical_separation,
    pairwise,
    soft_hyperspherical_separation,
    uniformity,
)
from lightning_hsu.functional._fused_family import supports
from lightning_hsu.functional.kernels import AngularKernel, GaussianKernel, RieszKernel

from .reference import (
    pairwise_compressive,
    pairwise_energy,
    pairwise_separation,
    pairwise_uniformity,
    unit_rows,
)
from .test_unchecked import HostSyncCounter

#: Environment variable naming the kernel under test: ``cpu`` or ``triton``.
CASES_ENV = "LIGHTNING_HSU_FUSED_CASES"
#: Per kernel: its module, the switch's variable, and the switch's values for fused and eager.
BACKENDS = {
    "cpu": ("lightning_hsu.functional._cpu_pairs", pairwise.CPU_KERNEL_ENV, "auto", "0"),
    "triton": ("lightning_hsu.functional._triton_pairs", pairwise.TRITON_ENV, "always", "0"),
}
BACKEND = os.environ.get(CASES_ENV, "")
if BACKEND not in BACKENDS:
    pytest.skip(f"run by test_cpu_pairs.py and test_triton_pairs.py, with {CASES_ENV} set", allow_module_level=True)
if BACKEND == "triton":
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get(pairwise.TRITON_ENV) != "always":
        pytest.skip("the Triton cases need TRITON_INTERPRET=1 and LIGHTNING_HSU_TRITON=always", allow_module_level=True)
    pytest.importorskip("triton")
MODULE, SWITCH, FUSED, EAGER = BACKENDS[BACKEND]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the fused launches (one entry per call of ``pair_block_sums``)."""
    module = importlib.import_module(MODULE)
    calls: list[int] = []
    original = module.pair_block_sums

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "pair_block_sums", counted)
    return calls


def _with_mode(fused: bool, fn: Callable[[], object]) -> object:
    """``fn()`` with the kernel under test switched on or off."""
    previous = os.environ.get(SWITCH)
    os.environ[SWITCH] = FUSED if fused else EAGER
    try:
        return fn()
    finally:
        if previous is None:
            del os.environ[SWITCH]
        else:
            os.environ[SWITCH] = previous


def _value_and_grad(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = w.detach().clone().requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


# ---- data ----------------------------------------------------------------------------------------
def neurons(case: str, n: int, d: int = 5, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    """``random``; ``duplicate``: two equal rows; ``antipodal``: a row and its negation. The two
    last with norms of 100, so that \\(\\epsilon\\) moves their cosines by 1e-9 only and the pair
    reaches the clamp \\(d^2 \\le 10^{-6}\\) in float64 as in float32."""
    shape = (n, d) if batch is None else (batch, n, d)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if case == "duplicate":
        w = 100.0 * w
        w[..., 5, :] = w[..., 2, :]
    elif case == "antipodal":
        w = 100.0 * w
        w[..., 7, :] = -w[..., 3, :]
    return w


def assert_matches(
    fused_fn: Callable[[torch.Tensor], torch.Tensor],
    reference_fn: Callable[[torch.Tensor], torch.Tensor],
    w64: torch.Tensor,
    grad_scale: float | None = None,
) -> None:
    """Fused (float32) against eager (float32) and the float64 reference, value and gradient.

    Gradients are compared up to a fraction of ``grad_scale`` (default: the reference's largest
    entry): where the gradient vanishes but its terms do not, float32 leaves their rounding.
    """
    w = w64.float()
    value, grad = _with_mode(True, lambda: _value_and_grad(fused_fn, w))  # type: ignore[misc]
    eager_value, eager_grad = _with_mode(False, lambda: _value_and_grad(fused_fn, w))  # type: ignore[misc]
    ref_value, ref_grad = _value_and_grad(reference_fn, w64)
    scale = float(ref_grad.abs().max()) if grad_scale is None else grad_scale
    # eager and fused see the same float32 cosines: apart by the order of their float32 sums
    torch.testing.assert_close(value, eager_value, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-5 * scale)
    # the float64 formula: float32's rounding of the cosines on top
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-4 * scale)


CASES = ["random", "duplicate", "antipodal"]
SIZES = [37, 64, 130]  # under, at and over the kernel's 128-column tile, not multiples of its rows


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("power", [0.0, 1.0, 2.0, 1.5])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", SIZES)
def test_energy_matches_eager_and_float64(
    n: int, case: str, power: float, half_space: bool, launches: list[int]
) -> None:
    def energy(x: torch.Tensor) -> torch.Tensor:
        return hyperspherical_energy(x, power=power, half_space=half_space, check_finite=False)

    assert_matches(energy, lambda x: pairwise_energy(x, power, half_space), neurons(case, n))
    assert launches, "the fused kernel did not run"


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("power", [0.0, 2.0])
@pytest.mark.parametrize("case", CASES)
def test_a_batch_of_layers_matches_eager_and_float64(
    case: str, power: float, half_space: bool, launches: list[int]
) -> None:
    """``[3, 37, 5]``: three layers in one launch (the CUDA graphs batch layers of one shape)."""

    def energy(x: torch.Tensor) -> torch.Tensor:
        return hyperspherical_energy(x, power=power, half_space=half_space, check_finite=False)

    assert_matches(energy, lambda x: pairwise_energy(x, power, half_space), neurons(case, 37, batch=3))
    assert len(launches) == 1


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("case", CASES)
def test_checked_energy_takes_the_fused_kernel_too(case: str, half_space: bool, launches: list[int]) -> None:
    def energy(x: torch.Tensor) -> torch.Tensor:
        return hyperspherical_energy(x, power=2.0, half_space=half_space)

    assert_matches(energy, lambda x: pairwise_energy(x, 2.0, half_space), neurons(case, 64))
    assert launches


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [37, 130])
def test_hard_separation_matches_eager_and_float64(n: int, case: str, half_space: bool, launches: list[int]) -> None:
    """MHS without host sync: the closest pairs as a kernel whose threshold stays on the device."""

    def separation(x: torch.Tensor) -> torch.Tensor:
        return hyperspherical_separation(x, half_space=half_space, check_finite=False)

    w = neurons(case, n)
    # a tied pair of duplicates has a vanishing gradient; its terms are about 2 r = 2 / |w|
    term = float(2.0 / torch.linalg.vector_norm(w, dim=-1).min())
    assert_matches(separation, lambda x: pairwise_separation(x, half_space), w, grad_scale=term)
    assert launches


@pytest.mark.parametrize("check_finite", [True, False], ids=["shift-number", "shift-tensor"])
@pytest.mark.parametrize("t", [2.0, 25.0], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [37, 130])
def test_uniformity_matches_eager_and_float64(
    n: int, case: str, half_space: bool, t: float, check_finite: bool, launches: list[int]
) -> None:
    """Wang-Isola uniformity: the Gaussian kernel unshifted (t = 2) and, where a value could
    underflow in float32 (t = 25), with its shift a number or a device tensor."""

    def value(x: torch.Tensor) -> torch.Tensor:
        return uniformity(x, t=t, half_space=half_space, check_finite=check_finite)

    assert_matches(value, lambda x: pairwise_uniformity(x, t, half_space), neurons(case, n))
    assert launches


def test_batched_uniformity_has_one_shift_per_layer(launches: list[int]) -> None:
    w = neurons("random", 37, batch=3)
    w[1] *= torch.linspace(0.1, 3.0, 5, dtype=torch.float64)  # a layer with other distances

    def value(x: torch.Tensor) -> torch.Tensor:
        return uniformity(x, t=25.0, check_finite=False)  # shifted: t > 19 could underflow in float32

    assert_matches(value, lambda x: pairwise_uniformity(x, 25.0, False), w)
    assert len(launches) == 1


def test_soft_separation_matches_eager_and_float64(launches: list[int]) -> None:
    def value(x: torch.Tensor) -> torch.Tensor:
        return soft_hyperspherical_separation(x, temperature=0.1, half_space=True, check_finite=False)

    def reference(x: torch.Tensor) -> torch.Tensor:
        return 0.1 * pairwise_uniformity(x, 10.0, True)

    assert_matches(value, reference, neurons("random", 64))
    assert launches


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
def test_compressive_energy_matches_eager_and_float64(half_space: bool, launches: list[int]) -> None:
    """CoMHE: four projections to 6 dimensions, each one batch element of one launch."""
    projections = torch.randn(4, 6, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def value(x: torch.Tensor) -> torch.Tensor:
        return compressive_energy(x, projections.to(x.dtype), half_space=half_space, check_finite=False)

    assert_matches(value, lambda x: pairwise_compressive(x, projections, half_space), neurons("random", 64, d=20))
    assert len(launches) == 1


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("sharded", [False, True], ids=["strips", "shards"])
def test_strip_and_full_row_schedules_match_eager_and_float64(
    sharded: bool, half_space: bool, launches: list[int]
) -> None:
    """Past one block: strips of 48 rows (the tile sum apart, no fold), or the full rows of two
    shards (the fold per block), whose values and gradients sum to the whole."""

    def energy(x: torch.Tensor) -> torch.Tensor:
        shards = [(0, 2), (1, 2)] if sharded else [None]
        parts = [
            hyperspherical_energy(x, half_space=half_space, chunk_size=48, shard=shard, check_finite=False)
            for shard in shards
        ]
        return torch.stack(parts).sum(0)

    assert_matches(energy, lambda x: pairwise_energy(x, 2.0, half_space), neurons("duplicate", 130))
    assert len(launches) >= 3


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
def test_a_layer_past_the_eager_strips_is_one_fused_block(half_space: bool, launches: list[int]) -> None:
    """600 neurons of 512 inputs: past the eager path's one-block limit (512), one fused block on the
    CPU (its Gram matrix in strips mirrored, the projection folded), as on a GPU."""

    def energy(x: torch.Tensor) -> torch.Tensor:
        return hyperspherical_energy(x, half_space=half_space, check_finite=False)

    assert_matches(energy, lambda x: pairwise_energy(x, 2.0, half_space), neurons("antipodal", 600, d=512))
    assert len(launches) == 1


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("kernel", [RieszKernel(0.0), RieszKernel(2.0), GaussianKernel(2.0, 0.5)], ids=repr)
def test_batched_strips_and_rows_match_eager(kernel, half_space: bool, launches: list[int]) -> None:
    """A batch of 3 through the strip and full-row schedules themselves (on the CPU the public
    functions split a batch per element before them; on a GPU they do not)."""
    unit = unit_rows(neurons("antipodal", 70, batch=3)).float()
    sq = torch.linalg.vector_norm(unit, dim=-1).square()
    r = torch.ones(3, 70, 1)

    def both(fused: bool) -> list[torch.Tensor]:
        strips = _with_mode(fused, lambda: pairwise._upper_strip_sum(unit, kernel, half_space, 32, True, sq, None))
        rows = _with_mode(fused, lambda: pairwise._row_block_sum(unit, kernel, half_space, 32, True, (10, 60), sq, r))
        return [*strips, *rows]  # type: ignore[list-item]

    fused_results, eager_results = both(True), both(False)
    for ours, eager in zip(fused_results, eager_results, strict=True):
        torch.testing.assert_close(ours, eager, rtol=2e-5, atol=1e-5 * float(eager.abs().max()))
    assert len(launches) == 3 + 2  # three strips, two row blocks of the range


def test_nan_neurons_give_nan_on_both_paths(launches: list[int]) -> None:
    """``check_finite=False``: a NaN neuron makes the value NaN (the caller's single check), fused or not."""
    w = neurons("random", 37).float()
    w[4, 1] = math.nan
    for half_space in (False, True):
        fused_value = _with_mode(
            "always", lambda h=half_space: hyperspherical_energy(w, half_space=h, check_finite=False)
        )
        eager_value = _with_mode(False, lambda h=half_space: hyperspherical_energy(w, half_space=h, check_finite=False))
        assert torch.isnan(fused_value) and torch.isnan(eager_value)
    assert launches


def test_the_fused_path_makes_no_host_sync(launches: list[int]) -> None:
    w = neurons("random", 64).float().requires_grad_()
    with HostSyncCounter() as counter:
        hyperspherical_energy(w, half_space=True, check_finite=False).backward()
    assert counter.syncs == [] and launches


def test_what_stays_eager(launches: list[int]) -> None:
    """The angular kernel (no ``acos`` in Triton's interpreter; the C kernel follows the Triton one), float64, a
    kernel subclass, the switch off."""
    w = neurons("random", 37)

    class Scaled(RieszKernel):
        pass

    hyperspherical_energy(w.float(), distance="angular", check_finite=False)
    hyperspherical_energy(w, check_finite=False)  # float64
    pairwise.pairwise_kernel_sum(unit_rows(w).float().unsqueeze(0), Scaled(2.0))
    _with_mode(False, lambda: hyperspherical_energy(w.float(), check_finite=False))
    assert not launches
    assert not supports(AngularKernel(1.0)) and supports(RieszKernel(1.0))
