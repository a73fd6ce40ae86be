"""The compiled C kernel's rows shared between threads (``functional/_cpu_pairs.c``, ``parallel_rows``).

A call's rows are claimed a grain at a time by the threads of Torch's OpenMP pool.
Each row's results are computed the same way whichever thread walks it, so every result here must
equal the one-thread call's bit for bit; the helpers' row count shows that they took part.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from lightning_hsu.functional import _cpu_pairs, _matmul, _product_threads, hyperspherical_energy
from lightning_hsu.functional.kernels import ClosestPairsKernel, GaussianKernel, PairKernel, RieszKernel

T = TypeVar("T")
pytestmark = pytest.mark.skipif(_cpu_pairs._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    assert _cpu_pairs.ready()
    yield
    torch.set_num_threads(threads)


def _block_case(batch: int, n: int, d: int, raw: bool, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, n, d, generator=generator)
    w[:, 7] = w[:, 3]  # a duplicate pair: the clamp
    r = torch.linalg.vector_norm(w, dim=-1).reciprocal()
    if raw:  # raw products, the projection folded into the coefficients
        return {"gram": w @ w.mT, "sq": torch.ones(batch, n), "row_scale": r, "col_scale": r}
    unit = w * r.unsqueeze(-1)
    return {"gram": unit @ unit.mT, "sq": (unit * unit).sum(-1), "row_scale": r}


def _sums(case: dict, kernel: PairKernel, half_space: bool, threads: int, **extra: object) -> list[torch.Tensor]:
    torch.set_num_threads(threads)
    block = case["gram"].clone()
    sums = _cpu_pairs.pair_block_sums(
        block,
        0,
        kernel,
        half_space=half_space,
        sq=case["sq"],
        with_grad=True,
        row_scale=case["row_scale"],
        col_scale=case.get("col_scale"),
        **extra,
    )
    return [*sums, block]


def _until_helped(call: Callable[[], T], tries: int = 400) -> T:
    """``call()`` until the helper threads walked some of its rows; its last result."""
    before = _cpu_pairs.rows_walked_by_helpers()
    for _ in range(tries):
        result = call()
        if _cpu_pairs.rows_walked_by_helpers() > before:
            return result
    pytest.fail(f"the helper threads walked no row in {tries} calls")


KERNELS = {
    "log": RieszKernel(0.0),
    "s=1": RieszKernel(1.0),
    "s=1.5": RieszKernel(1.5),
    "s=2": RieszKernel(2.0),
    "gaussian": GaussianKernel(1.0, shift=0.5),
    "closest": ClosestPairsKernel(torch.tensor(0.2)),
}


@pytest.mark.parametrize("kernel", list(KERNELS.values()), ids=list(KERNELS))
@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("raw", [False, True], ids=["unit", "raw"])
def test_a_block_shared_between_threads_equals_the_one_thread_block(
    kernel: PairKernel, half_space: bool, raw: bool
) -> None:
    """Sums, tile sums, antipodal sums and coefficients of a batch of 3 blocks of 300 rows, two threads and three
    (more than this machine's cores), against one thread: bit for bit."""
    case = _block_case(3, 300, 16, raw)
    expected = _sums(case, kernel, half_space, 1, width=41)
    for threads in (2, 3):
        got = _until_helped(lambda t=threads: _sums(case, kernel, half_space, t, width=41))
        for ours, theirs in zip(got, expected, strict=True):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("case", ["random", "duplicate", "orthonormal", "nan"])
def test_the_closest_pair_search_shared_between_threads_equals_one_thread(case: str, half_space: bool) -> None:
    """Hard MHS's two passes over a 600 x 600 Gram matrix: the scaled upper triangle, the largest cosine and the
    tied pairs (the orthonormal frame ties every pair; a NaN in a row a helper may walk makes the result NaN)."""
    n = 600
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(3))
    if case == "orthonormal":
        w = torch.linalg.qr(w)[0] * 2.0
    elif case == "duplicate":
        w[300] = w[17]
    r = torch.linalg.vector_norm(w, dim=1, keepdim=True).reciprocal()
    gram = w @ w.T
    if case == "nan":
        gram[2, 550] = float("nan")

    def search(threads: int) -> tuple:
        torch.set_num_threads(threads)
        cosines = gram.clone()
        largest = _cpu_pairs.scale_and_largest_cosine(cosines, r, half_space=half_space)
        if largest != largest:
            return cosines, largest, None
        return cosines, largest, _cpu_pairs.tied_pairs(cosines, largest - 1e-6, half_space=half_space)

    cosines, largest, ties = search(1)
    got_cosines, got_largest, got_ties = _until_helped(lambda: search(2))
    torch.testing.assert_close(got_cosines.triu(), cosines.triu(), rtol=0.0, atol=0.0, equal_nan=True)
    if case == "nan":
        assert got_largest != got_largest and largest != largest
        return
    assert got_largest == largest
    for ours, theirs in zip(got_ties, ties, strict=True):
        assert torch.equal(ours, theirs)
    if case == "orthonormal":
        assert len(ties[0]) == (n * (n - 1) if half_space else n * (n - 1) // 2)


def test_calls_from_two_python_threads_at_once_each_get_their_own_result() -> None:
    """Each Python thread's calls share their rows with a team of their own, and both stay right."""
    cases = [_block_case(1, 600, 8, raw=False, seed=seed) for seed in (1, 2)]
    expected = [_sums(case, RieszKernel(2.0), True, 1) for case in cases]
    torch.set_num_threads(2)
    failures: list[str] = []

    def worker(index: int) -> None:
        for _ in range(15):
            got = _sums(cases[index], RieszKernel(2.0), True, 2)
            if not all(torch.equal(a, b) for a, b in zip(got, expected[index], strict=True)):
                failures.append(f"thread {index}")

    workers = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert not failures


def test_the_team_is_torchs_own_openmp_pool() -> None:
    """The rows go to the threads of the OpenMP runtime Torch loaded (no second pool competes for the cores)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this Torch does not run its intra-op pool on OpenMP")
    runtime = _cpu_pairs._openmp_runtime()
    assert runtime is not None
    loaded = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
    assert runtime._name in loaded and Path(runtime._name).is_relative_to(Path(torch.__file__).parent.parent)


def test_without_an_openmp_runtime_a_call_stays_on_the_calling_thread() -> None:
    case = _block_case(2, 500, 8, raw=False)
    expected = _sums(case, RieszKernel(2.0), True, 1)
    library = _cpu_pairs._library()
    library.use_openmp_runtime(None, None)
    try:
        before = _cpu_pairs.rows_walked_by_helpers()
        for _ in range(20):
            got = _sums(case, RieszKernel(2.0), True, 2)
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert _cpu_pairs.rows_walked_by_helpers() == before
    finally:
        _cpu_pairs.attach_openmp_runtime(library)


def _spy_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The `threads` argument of each call of the library's block function."""
    library = _cpu_pairs._library()
    calls: list[int] = []

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(library, name)

        @staticmethod
        def pair_block_sums_f32(*args: object) -> int:
            calls.append(int(args[-1]))  # type: ignore[call-overload]
            return library.pair_block_sums_f32(*args)

    monkeypatch.setattr(_cpu_pairs, "_library", lambda: Spy())
    return calls


class _Answer(_product_threads.ProductThreadChooser):
    """A product chooser that always gives the same answer, with or without a load seen, for a size class that
    keeps all threads (a one-thread answer is a probe) or not (one thread is the class's choice)."""

    def __init__(self, all_threads: bool, loaded: bool, class_wide: bool = True) -> None:
        super().__init__()
        self.answer = all_threads
        self.class_wide = class_wide
        self._loaded = loaded

    def use_all_threads(self, work: int, kind: str = "", threads: int | None = None) -> bool:
        return self.answer

    def keeps_all_threads(self, work: int, kind: str = "") -> bool:
        return self.class_wide


@pytest.mark.parametrize(
    ("wide", "class_wide", "loaded", "threads"),
    [
        (True, True, False, 2),
        (True, True, True, 2),
        (False, True, False, 2),
        (False, False, False, 1),
        (False, True, True, 1),
    ],
    ids=["products-on-all", "products-on-all-loaded", "one-thread-probe-idle", "class-on-one-idle", "loaded"],
)
def test_a_large_call_takes_all_threads_where_the_product_before_it_did_or_was_a_probe(
    wide: bool, class_wide: bool, loaded: bool, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a pair sum on two threads a large block's call takes both threads where the product before it ran
    on both, or ran on one only as a probe of a class that keeps all threads with no load seen; one where that
    product's class chose one thread (a load seen ending for a moment left the classes there, item 68), or a
    load put it on one (a busy core)."""
    calls = _spy_threads(monkeypatch)
    monkeypatch.setattr(_product_threads, "CHOOSER", _Answer(wide, loaded, class_wide))
    monkeypatch.delenv(_product_threads.PRODUCT_THREADS_ENV, raising=False)
    torch.set_num_threads(2)
    hyperspherical_energy(torch.randn(1024, 16, generator=torch.Generator().manual_seed(0)), half_space=True)
    assert calls == [threads]


def test_before_item_68_a_large_call_took_all_threads_wherever_no_load_was_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The switch `_matmul.KERNEL_FOLLOWS_CLASS` (kept for the benchmarks) brings back the rule before item 68."""
    calls = _spy_threads(monkeypatch)
    monkeypatch.setattr(_product_threads, "CHOOSER", _Answer(False, False, class_wide=False))
    monkeypatch.setattr(_matmul, "KERNEL_FOLLOWS_CLASS", False)
    monkeypatch.delenv(_product_threads.PRODUCT_THREADS_ENV, raising=False)
    torch.set_num_threads(2)
    hyperspherical_energy(torch.randn(1024, 16, generator=torch.Generator().manual_seed(0)), half_space=True)
    assert calls == [2]


def test_a_small_block_stays_on_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_threads(monkeypatch)
    torch.set_num_threads(2)
    with _matmul.passes_on_one_thread(torch.device("cpu")):
        hyperspherical_energy(torch.randn(200, 16), half_space=True)  # 200 x 200 entries
    assert calls == [1]


def _mirrored_by_index(matrices: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """The statement of `_cpu_pairs.mirror_block`: (j, i) takes (i, j) for i in rows, j in cols, j > i."""
    expected = matrices.clone()
    i, j = torch.meshgrid(torch.arange(*rows), torch.arange(*cols), indexing="ij")
    above = j > i
    i, j = i[above], j[above]
    expected[:, j, i] = matrices[:, i, j]
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("batch", "n", "rows", "cols"),
    [
        (1, 70, (0, 70), (0, 70)),  # the whole upper triangle, tiles of 32 with a tail of 6
        (3, 70, (5, 40), (5, 70)),  # a strip and its diagonal tile
        (2, 64, (0, 32), (32, 64)),  # an off-diagonal block, a power of two
        (1, 70, (40, 70), (0, 30)),  # a block below the diagonal: nothing lies above it
        (3, 300, (0, 300), (0, 300)),  # on two threads: grains of rows across the batch elements
    ],
)
def test_mirror_block_copies_the_upper_entries_below_the_diagonal(dtype, batch, n, rows, cols) -> None:
    torch.set_num_threads(2)
    before = _cpu_pairs.rows_walked_by_helpers()
    matrices = torch.randn(batch, n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64).to(dtype)
    expected = _mirrored_by_index(matrices, rows, cols)
    _cpu_pairs.mirror_block(matrices, rows, cols)
    assert torch.equal(matrices, expected)
    if n == 300:  # 270,000 entries: shared with the pool's other thread
        assert _cpu_pairs.rows_walked_by_helpers() > before


def test_mirror_block_refuses_what_it_cannot_walk() -> None:
    with pytest.raises(ValueError, match="contiguous rows"):
        _cpu_pairs.mirror_block(torch.zeros(1, 8, 8).mT, (0, 4), (4, 8))
    with pytest.raises(ValueError, match="float32 or float64"):
        _cpu_pairs.mirror_block(torch.zeros(1, 8, 8, dtype=torch.float16), (0, 4), (4, 8))
    with pytest.raises(ValueError, match="outside a 8 x 8 matrix"):
        _cpu_pairs.mirror_block(torch.zeros(1, 8, 8), (0, 4), (4, 9))
