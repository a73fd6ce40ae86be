"""The pair sums' elementwise passes on one thread, products on all or one (issue 20: a busy CPU).

``passes_on_one_thread`` only changes how many threads run each pass, not what is computed: the
values and gradients must equal those with every pass on all threads (``SERIAL_PASSES = False``,
the path before) and the float64 references, for every kernel and schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lightning_hsu.functional import _matmul, hyperspherical_energy, pairwise_kernel_sum, uniformity
from lightning_hsu.functional._matmul import passes_on_one_thread
from lightning_hsu.functional._product_threads import PRODUCT_THREADS_ENV
from lightning_hsu.functional.kernels import AngularKernel, GaussianKernel, PairKernel, RieszKernel
from lightning_hsu.functional.pairwise import sharded_scale

from .reference import concat_energy, value_and_grad
from .threads import operators_and_threads, thread_spy

KERNELS = [
    RieszKernel(0.0),
    RieszKernel(1.0),
    RieszKernel(2.0),
    AngularKernel(0.0),
    AngularKernel(2.0),
    GaussianKernel(2.0),
]


def _both_paths(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, monkeypatch: pytest.MonkeyPatch):
    """(value, gradient) with the passes on one thread, then with every pass on all threads."""
    monkeypatch.setattr(_matmul, "SERIAL_PASSES", True)
    serial = value_and_grad(fn, w)
    monkeypatch.setattr(_matmul, "SERIAL_PASSES", False)
    parallel = value_and_grad(fn, w)
    assert torch.get_num_threads() == 2
    return serial, parallel


def _weights(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


# (chunk_size, shard world size, kernel block elements) on 70 neurons: one block in kernel row
# blocks (37 rows and a 33-row tail), upper strips of 16 rows (a 6-row tail), strips of 40 rows
# in kernel blocks of 7 rows (the 30-row strip in blocks of 16), full rows of 3 shards, alone and
# in kernel blocks of 5 rows, and in strips of 9
SCHEDULES = [
    (None, None, 37 * 70),
    (None, None, 2**16),
    (16, None, 2**16),
    (40, None, 7 * 70),
    (None, 3, 2**16),
    (None, 3, 5 * 70),
    (9, 3, 2**16),
]


def _reference_sum(unit: torch.Tensor, kernel: PairKernel, half_space: bool) -> torch.Tensor:
    """The kernel over the strict upper triangle of the full Gram matrix of ``[u; -u]`` (or ``u``)."""
    x = torch.cat([unit[0], -unit[0]]) if half_space else unit[0]
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    value, _ = kernel((x @ x.T)[i, j].view(1, 1, -1), False)
    return value.sum()


def _sum(kernel: PairKernel, half_space: bool, chunk: int | None, world: int | None):
    def fn(u: torch.Tensor) -> torch.Tensor:
        if world is None:
            return pairwise_kernel_sum(u, kernel, half_space=half_space, chunk_size=chunk).sum()
        shares = [
            pairwise_kernel_sum(u, kernel, half_space=half_space, chunk_size=chunk, shard=(r, world))
            for r in range(world)
        ]
        return torch.stack(shares).sum()

    return fn


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
@pytest.mark.parametrize(("chunk", "world", "block"), SCHEDULES)
def test_pair_sum_on_one_thread_equals_all_threads_and_float64(
    kernel: PairKernel, half_space: bool, chunk: int | None, world: int | None, block: int, monkeypatch
) -> None:
    from lightning_hsu.functional import pairwise

    monkeypatch.setattr(pairwise, "KERNEL_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(pairwise, "MIN_KERNEL_BLOCK_ROWS", 1)
    unit64 = torch.nn.functional.normalize(_weights(70, 12, torch.float64), dim=-1).unsqueeze(0)
    fn = _sum(kernel, half_space, chunk, world)
    (v64, g64), (p64, pg64) = _both_paths(fn, unit64, monkeypatch)
    ref, ref_grad = value_and_grad(lambda u: _reference_sum(u, kernel, half_space), unit64)
    torch.testing.assert_close(v64, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g64, ref_grad, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(v64, p64, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g64, pg64, rtol=1e-12, atol=1e-12)
    (v32, g32), (p32, pg32) = _both_paths(fn, unit64.float(), monkeypatch)
    torch.testing.assert_close(v32, p32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g32, pg32, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-3)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("distance", ["euclidean", "angular"])
@pytest.mark.parametrize(("n", "chunk"), [(600, None), (300, None), (300, 64)])
def test_energy_on_one_thread_equals_all_threads(
    half_space: bool, power: float, distance: str, n: int, chunk: int | None, monkeypatch
) -> None:
    """The normalising Function, float32 through oneDNN: one block in 2**16-entry kernel blocks
    (300: blocks of 218 rows and a tail), upper strips (600: 436 rows and a 164-row tail),
    explicit strips of 64 rows."""
    w = _weights(n, 20, torch.float32, seed=1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return hyperspherical_energy(x, power=power, distance=distance, half_space=half_space, chunk_size=chunk)

    (value, grad), (par_value, par_grad) = _both_paths(fn, w, monkeypatch)
    torch.testing.assert_close(value, par_value, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grad, par_grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())
    if distance == "euclidean":
        ref, ref_grad = value_and_grad(lambda x: concat_energy(x, power, half_space), w.double())
        torch.testing.assert_close(value.double(), ref, rtol=1e-4, atol=0.0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-4 * ref_grad.abs().max().item())


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("half_space", [False, True])
def test_sharded_energy_on_one_thread_sums_to_the_whole(half_space: bool, monkeypatch) -> None:
    w = _weights(150, 9, torch.float64, seed=2)
    monkeypatch.setattr(_matmul, "SERIAL_PASSES", True)
    whole, whole_grad = value_and_grad(lambda x: hyperspherical_energy(x, half_space=half_space), w)
    shares = [
        value_and_grad(lambda x, r=r: hyperspherical_energy(x, half_space=half_space, shard=(r, 4)), w)
        for r in range(4)
    ]
    torch.testing.assert_close(sum(v for v, _ in shares), whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sum(g for _, g in shares), whole_grad, rtol=1e-10, atol=1e-14)
    assert sharded_scale(4) == 4.0


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("half_space", [False, True])
def test_uniformity_on_one_thread_equals_all_threads(half_space: bool, monkeypatch) -> None:
    w = _weights(90, 7, torch.float64, seed=3)
    (value, grad), (par_value, par_grad) = _both_paths(lambda x: uniformity(x, half_space=half_space), w, monkeypatch)
    torch.testing.assert_close(value, par_value, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad, par_grad, rtol=1e-12, atol=1e-13)


class _Recording(PairKernel):
    """Riesz s = 2, recording the intra-op thread count each time it is evaluated."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def __call__(self, cos: torch.Tensor, with_derivative: bool):
        self.threads.append(torch.get_num_threads())
        return RieszKernel(2.0)(cos, with_derivative)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [None, 16])
def test_kernel_runs_on_one_thread_and_products_on_all(dtype, chunk, monkeypatch) -> None:
    """float32 takes oneDNN (``_onednn_product``), float64 ``torch.bmm``/``baddbmm_``: both on 2 threads
    (with the products' threads fixed to all; their online choice: ``test_product_threads.py``)."""
    monkeypatch.setenv(PRODUCT_THREADS_ENV, "all")
    products: list[int] = []
    monkeypatch.setattr(_matmul, "_onednn_product", thread_spy(products, _matmul._onednn_product))
    monkeypatch.setattr(torch, "bmm", thread_spy(products, torch.bmm))
    monkeypatch.setattr(torch.Tensor, "baddbmm_", thread_spy(products, torch.Tensor.baddbmm_))
    kernel = _Recording()
    unit = torch.nn.functional.normalize(_weights(40, 6, dtype), dim=-1).unsqueeze(0).requires_grad_()
    pairwise_kernel_sum(unit, kernel, half_space=True, chunk_size=chunk).sum().backward()
    assert kernel.threads and set(kernel.threads) == {1}
    assert products and set(products) == {2}
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_thread_count_restored_after_an_error() -> None:
    class Failing(PairKernel):
        def __call__(self, cos: torch.Tensor, with_derivative: bool):
            raise RuntimeError("kernel failed")

    unit = torch.nn.functional.normalize(_weights(10, 3, torch.float64), dim=-1).unsqueeze(0)
    with pytest.raises(RuntimeError, match="kernel failed"):
        pairwise_kernel_sum(unit, Failing())
    assert torch.get_num_threads() == 2
    assert getattr(_matmul._scope, "threads", None) is None


@pytest.mark.usefixtures("two_threads")
def test_passes_on_one_thread_only_narrows_the_cpu_pool_once(monkeypatch) -> None:
    with passes_on_one_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1
        with passes_on_one_thread(torch.device("cpu")):  # nested: the outer setting stays
            assert torch.get_num_threads() == 1
            monkeypatch.setenv(PRODUCT_THREADS_ENV, "all")
            with _matmul.chosen_threads(10**9, _matmul.ONEDNN_KIND):
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with passes_on_one_thread(torch.device("meta")):  # another device: nothing changes
        assert torch.get_num_threads() == 2
    monkeypatch.setattr(_matmul, "SERIAL_PASSES", False)
    with passes_on_one_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 2
    with _matmul.chosen_threads(10**9, _matmul.ONEDNN_KIND):  # outside the context: nothing to widen
        assert torch.get_num_threads() == 2


def _regularizer_penalties() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Every regulariser whose own passes lie outside the pair sums, as a function of the neurons
    (a fresh pole per call, so both paths start from the same pole)."""
    from lightning_hsu.functional import (
        compressive_energy,
        gram_determinant_penalty,
        hyperspherical_separation,
        soft_hyperspherical_separation,
    )
    from lightning_hsu.regularizers import MHC, MHP

    g = torch.Generator().manual_seed(5)
    projections = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    return {
        "mhs half": lambda x: hyperspherical_separation(x, half_space=True),
        "mhs full, 2 blocks": lambda x: hyperspherical_separation(x, chunk_size=16),
        "soft mhs": lambda x: soft_hyperspherical_separation(x, half_space=True),
        "mgd half": lambda x: gram_determinant_penalty(x, half_space=True),
        "mgd full": lambda x: gram_determinant_penalty(x),
        "comhe": lambda x: compressive_energy(x, projections, half_space=True),
        "mhp": lambda x: MHP(half_space=True, seed=1).penalty(x, step=0),
        "mhc": lambda x: MHC(seed=1).penalty(x, step=0),
    }


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("name", list(_regularizer_penalties()))
def test_regularizers_on_one_thread_equal_all_threads(name: str, monkeypatch) -> None:
    fn = _regularizer_penalties()[name]
    w = _weights(40, 7, torch.float64, seed=4)
    (value, grad), (par_value, par_grad) = _both_paths(fn, w, monkeypatch)
    torch.testing.assert_close(value, par_value, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, par_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("two_threads")
def test_regularizers_own_passes_run_on_one_thread(monkeypatch) -> None:
    """A pass inside each regulariser (MHS's search for tied pairs, MGD's normalisation, the pole's
    slope, uniformity's normalisation) sees one thread; the intra-op pool is whole afterwards."""
    from lightning_hsu.functional import gram_determinant, pairwise, separation
    from lightning_hsu.regularizers import MHP

    seen: dict[str, list[int]] = {"tied pairs": [], "mgd rows": [], "pole slope": [], "normalise": []}
    monkeypatch.setattr(separation, "_tied_pairs", thread_spy(seen["tied pairs"], separation._tied_pairs))
    monkeypatch.setattr(
        gram_determinant, "row_normalization", thread_spy(seen["mgd rows"], gram_determinant.row_normalization)
    )
    # uniformity's rows are normalised inside its pair sum
    monkeypatch.setattr(pairwise, "row_normalization", thread_spy(seen["normalise"], pairwise.row_normalization))
    pole = MHP(seed=0)
    monkeypatch.setattr(pole, "pole_slope", thread_spy(seen["pole slope"], pole.pole_slope))
    w = _weights(30, 7, torch.float32).requires_grad_()
    for fn in _regularizer_penalties().values():
        fn(w).backward()
    uniformity(w).backward()
    pole.penalty(w, step=0).backward()
    assert all(calls and set(calls) == {1} for calls in seen.values()), seen
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("choice", ["measured", "all threads win", "one thread wins"])
def test_mgd_factorisations_take_the_threads_the_chooser_chose(choice, monkeypatch) -> None:
    """MGD's Cholesky factorisations and their inverses are split between threads by LAPACK like a
    product: they are measured under kinds of their own and run on the threads chosen for them."""
    from lightning_hsu.functional import _product_threads, gram_determinant_penalty

    chooser = _product_threads.ProductThreadChooser()
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    if choice != "measured":  # as on an idle machine / a busy core, every class decided
        monkeypatch.setattr(chooser, "use_all_threads", lambda work, kind="", threads=None: choice == "all threads win")
    seen: dict[str, list[int]] = {"cholesky": [], "inverse": []}
    monkeypatch.setattr(torch.linalg, "cholesky_ex", thread_spy(seen["cholesky"], torch.linalg.cholesky_ex))
    monkeypatch.setattr(torch, "cholesky_inverse", thread_spy(seen["inverse"], torch.cholesky_inverse))
    w = _weights(40, 7, torch.float32).requires_grad_()
    gram_determinant_penalty(w, half_space=True).backward()  # A + B and A - B: two of each a call
    gram_determinant_penalty(w, half_space=True).backward()
    expected = {"measured": [2, 2, 1, 1], "all threads win": [2] * 4, "one thread wins": [1] * 4}[choice]
    # measured: the first two of a size class take the caller's threads (the first one unmeasured:
    # one-time costs), the next three one thread (again the first unmeasured)
    assert seen == {"cholesky": expected, "inverse": expected}
    if choice == "measured":
        recorded = {kind: (len(s.all_threads), len(s.one_thread)) for (kind, _), s in chooser._classes.items()}
        assert recorded["torch.float64 cholesky"] == recorded["torch.float64 cholesky_inverse"] == (1, 1)
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(
    ("choice", "follow", "expected"),
    [("all threads win", True, 2), ("one thread wins", True, 1), ("all threads win", False, 1)],
)
def test_mgd_long_passes_take_the_threads_of_the_gram_product(choice, follow, expected, monkeypatch) -> None:
    """MGD's float64 passes over the whole kernel matrix run on the threads its Gram product took: both
    threads where all threads won it (an idle machine), one where one thread did (a busy core) or with
    ``PASSES_FOLLOW_PRODUCTS`` off. The factorisations inside still take their own choice, and the
    pool is whole afterwards."""
    from lightning_hsu.functional import _product_threads, gram_determinant, gram_determinant_penalty

    chooser = _product_threads.ProductThreadChooser()
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    monkeypatch.setattr(_matmul, "PASSES_FOLLOW_PRODUCTS", follow)
    products_wide = choice == "all threads win"
    factorisation_wide = not products_wide  # the opposite choice: the passes must not take it over
    monkeypatch.setattr(
        chooser,
        "use_all_threads",
        lambda work, kind="", threads=None: factorisation_wide if "cholesky" in kind else products_wide,
    )
    passes: list[int] = []
    factorisations: list[int] = []
    monkeypatch.setattr(
        gram_determinant,
        "_neg_logdet_and_coefficients",
        thread_spy(passes, gram_determinant._neg_logdet_and_coefficients),
    )
    monkeypatch.setattr(gram_determinant, "_fold_projection", thread_spy(passes, gram_determinant._fold_projection))
    monkeypatch.setattr(torch.linalg, "cholesky_ex", thread_spy(factorisations, torch.linalg.cholesky_ex))
    w = _weights(300, 520, torch.float32).requires_grad_()  # a Gram matrix in strips (`_matmul.gram`)
    gram_determinant_penalty(w, half_space=True).backward()
    assert passes == [expected, expected]  # before the factorisations and after them
    assert factorisations == [2 if factorisation_wide else 1] * 2
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_mgd_with_long_passes_on_both_threads_equals_autograd_of_the_official_kernel(monkeypatch) -> None:
    """With its float64 passes on both threads (products chosen on all), MGD's value and its gradient
    against an upstream gradient other than one are those of autograd through the official
    concatenated 2n x 2n kernel."""
    from lightning_hsu.functional import _product_threads, gram_determinant_penalty

    from . import official

    chooser = _product_threads.ProductThreadChooser()
    monkeypatch.setattr(_product_threads, "CHOOSER", chooser)
    monkeypatch.setattr(chooser, "use_all_threads", lambda work, kind="", threads=None: True)
    w = _weights(300, 520, torch.float64, seed=3).requires_grad_()
    value = gram_determinant_penalty(w, half_space=True)
    (3.5 * value).backward()
    expected_w = w.detach().clone().requires_grad_()
    expected = official.mgd(expected_w, half_space=True)
    (3.5 * expected).backward()
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w.grad, expected_w.grad, rtol=1e-7, atol=1e-9)


# ---- the regularisers' backward (`one_thread_graph`) ------------------------------------------------
#: what may still run on all threads inside ``penalty.backward()``: the autograd engine's own seed and
#: accumulation into ``w.grad``, and the products (which choose their threads: test_product_threads.py)
_ENGINE_AND_PRODUCTS = {
    "aten.ones_like.default",
    "aten.detach.default",
    "aten.new_empty_strided.default",
    "aten.copy_.default",
    "aten.bmm.default",
    "aten.mm.default",
    "aten.baddbmm.default",
    "mkldnn._linear_pointwise.default",
}


def _backward_ops_on_all_threads(penalty: torch.Tensor) -> list[str]:
    seen = operators_and_threads(penalty.backward)
    return [op for op, threads in seen if threads > 1 and op not in _ENGINE_AND_PRODUCTS]


BUILT_IN = ["mhe", "mhs", "uniformity", "mgd", "mhp", "mhc", "comhe", "rmhp"]


def _built_in(name: str):
    from lightning_hsu.regularizers.registry import make_regularizer

    return make_regularizer(name, **({"half_space": True} if name in ("mhe", "mhs", "mhp", "comhe") else {}))


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("name", BUILT_IN)
def test_regularizer_backward_passes_run_on_one_thread(name, monkeypatch) -> None:
    """``loss.backward()`` runs each built-in penalty's backward passes on one thread (MHP's autograd
    backward took 3.5x its one-thread time on a busy core), and gives the pool back whole."""
    monkeypatch.setenv(PRODUCT_THREADS_ENV, "all")  # every product widens: only products may
    w = _weights(30, 7, torch.float32).requires_grad_()
    assert _backward_ops_on_all_threads(_built_in(name)(w, step=0)) == []
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_the_backward_check_can_fail(monkeypatch) -> None:
    """Without the wrapper MHP's backward passes are seen on all threads (the check above is live)."""
    from lightning_hsu.regularizers import MHP

    monkeypatch.setattr(MHP, "neurons_only", False)
    w = _weights(30, 7, torch.float32).requires_grad_()
    assert _backward_ops_on_all_threads(_built_in("mhp")(w, step=0)) != []


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("name", BUILT_IN)
def test_regularizer_value_and_gradient_unchanged_by_the_one_thread_graph(name, monkeypatch) -> None:
    """Against the same penalty computed without the wrapper (float64: the same numbers to rounding),
    with a fresh regulariser each time (the pole's game starts from the same pole)."""
    w = _weights(40, 9, torch.float64)
    wrapped = value_and_grad(lambda x: _built_in(name)(x, step=0), w)
    monkeypatch.setattr(type(_built_in(name)), "neurons_only", False)
    direct = value_and_grad(lambda x: _built_in(name)(x, step=0), w)
    torch.testing.assert_close(wrapped[0], direct[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wrapped[1], direct[1], rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("two_threads")
def test_penalty_backpropagates_twice_with_retain_graph() -> None:
    w = _weights(20, 5, torch.float32).requires_grad_()
    penalty = _built_in("mhs")(w, step=0)
    penalty.backward(retain_graph=True)
    first = w.grad.clone()
    penalty.backward()
    torch.testing.assert_close(w.grad, 2 * first)


def test_a_user_subclass_with_its_own_penalty_keeps_the_plain_graph() -> None:
    """A subclass's penalty may read learnable tensors besides the neurons: they must get their
    gradients, so the wrapper is off unless the subclass says ``neurons_only = True``."""
    from lightning_hsu.regularizers import MHE

    class Scaled(MHE):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.tensor(2.0, requires_grad=True)

        def penalty(self, neurons, *, step=None, check_finite=True):
            return self.scale * super().penalty(neurons, step=step, check_finite=check_finite)

    assert MHE.neurons_only and not Scaled.neurons_only
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        regularizer = Scaled()
        regularizer(_weights(10, 4, torch.float32).requires_grad_(), step=0).backward()
    finally:
        torch.set_num_threads(before)
    assert regularizer.scale.grad is not None
