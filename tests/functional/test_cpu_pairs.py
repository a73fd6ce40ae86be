"""The compiled C kernel of the pair sums on the CPU (``functional/_cpu_pairs.py``).

Its parity with the eager passes and with the float64 formulas is ``fused_cases.py`` (the cases it
shares with the Triton kernel), run in a fresh process; here are its build, its cache, what a
user without a compiler gets, and the layouts it is handed.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lightning_hsu.functional import _cpu_pairs, hyperspherical_energy, pairwise
from lightning_hsu.functional.kernels import RieszKernel

CASES_FILE = Path(__file__).with_name("fused_cases.py")
ROOT = Path(__file__).resolve().parents[2]
needs_compiler = pytest.mark.skipif(_cpu_pairs._compiler() is None, reason="no C compiler on this machine")


def run_fused_cases(backend: str, **env: str) -> None:
    """Run ``fused_cases.py`` for ``backend`` in a fresh process; every case must pass, none skip."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES_FILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, LIGHTNING_HSU_FUSED_CASES=backend, **env),
        timeout=540,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, **env),
        timeout=300,
    )


@needs_compiler
@pytest.mark.slow
def test_parity_cases_pass_in_a_fresh_process(tmp_path: Path) -> None:
    """Value and gradient of every fused regulariser against the eager passes and float64, built afresh."""
    run_fused_cases("cpu", **{_cpu_pairs.CACHE_ENV: str(tmp_path)})
    assert len(list(tmp_path.glob("cpu_pairs-*.so"))) == 1


def test_importing_the_package_neither_imports_nor_builds_the_kernel(tmp_path: Path) -> None:
    out = _python(
        """
        import sys, lightning_hsu, lightning_hsu.functional
        print("lightning_hsu.functional._cpu_pairs" in sys.modules)
        """,
        **{_cpu_pairs.CACHE_ENV: str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False" and not list(tmp_path.iterdir())


@needs_compiler
def test_the_library_is_built_once_and_loaded_from_the_cache_after(tmp_path: Path) -> None:
    code = """
        import time
        from lightning_hsu.functional import _cpu_pairs
        start = time.perf_counter()
        assert _cpu_pairs.ready()
        print(time.perf_counter() - start)
        """
    first = _python(code, **{_cpu_pairs.CACHE_ENV: str(tmp_path)})
    assert first.returncode == 0, first.stderr
    (library,) = tmp_path.iterdir()  # no partial build left beside it
    built = library.stat().st_mtime_ns
    second = _python(code, **{_cpu_pairs.CACHE_ENV: str(tmp_path)})
    assert second.returncode == 0, second.stderr
    assert [p.name for p in tmp_path.iterdir()] == [library.name] and library.stat().st_mtime_ns == built
    assert "RuntimeWarning" not in first.stderr + second.stderr


FALLBACK = """
    import json, os, warnings
    import torch
    from lightning_hsu.functional import hyperspherical_energy, pairwise
    w = torch.randn(700, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = []
        for _ in range(2):
            value = hyperspherical_energy(w, half_space=True)
            value.backward()
            values.append([float(value.detach()), w.grad.clone()])
            w.grad = None
    os.environ[pairwise.CPU_KERNEL_ENV] = "0"
    eager = hyperspherical_energy(w, half_space=True)
    eager.backward()
    same = all(v == float(eager.detach()) and torch.equal(g, w.grad) for v, g in values)
    ours = [str(c.message) for c in caught if "pair-sum kernel" in str(c.message)]
    print(json.dumps({"warnings": ours, "same_as_eager": same}))
    """


def test_without_a_compiler_the_eager_passes_run_after_one_warning(tmp_path: Path) -> None:
    """No ``$CC`` and nothing on ``PATH``: the same numbers as the eager passes, and one warning that says so."""
    empty = tmp_path / "bin"
    empty.mkdir()
    out = _python(FALLBACK, CC="", PATH=str(empty), **{_cpu_pairs.CACHE_ENV: str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["same_as_eager"]
    (message,) = result["warnings"]
    assert "no C compiler found" in message and "eager passes" in message


def test_a_failed_build_shows_the_compiler_output(tmp_path: Path) -> None:
    compiler = tmp_path / "broken-cc"
    compiler.write_text(
        '#!/bin/sh\nif [ "$1" = "--version" ]; then echo "broken-cc 1.0"; exit 0; fi\n'
        'echo "broken-cc: error: unrecognized option" >&2\nexit 1\n'
    )
    compiler.chmod(0o755)
    out = _python(FALLBACK, CC=str(compiler), **{_cpu_pairs.CACHE_ENV: str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    (message,) = result["warnings"]
    assert "CalledProcessError" in message and "unrecognized option" in message and result["same_as_eager"]
    assert not list((tmp_path / "cache").glob("*.so")), "a failed build left a library behind"


def test_a_library_that_computes_wrongly_is_refused_by_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    class Silent:  # writes nothing: every sum reads 0
        @staticmethod
        def pair_block_sums_f32(*args: object) -> int:
            return 0

    monkeypatch.setattr(_cpu_pairs, "_READY", [])
    monkeypatch.setattr(_cpu_pairs, "_library", lambda: Silent())
    with pytest.warns(RuntimeWarning, match="computed a probe block wrongly"):
        assert not _cpu_pairs.ready()
    assert pairwise._fused_pairs(torch.zeros(1, 4, 4), RieszKernel(2.0)) is None


def test_an_unknown_switch_value_is_an_error_that_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pairwise.CPU_KERNEL_ENV, "yes")
    with pytest.raises(ValueError, match="LIGHTNING_HSU_CPU_KERNEL='yes'"):
        hyperspherical_energy(torch.randn(8, 3))


@needs_compiler
@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None, reason="x86-64 with objdump"
)
def test_the_walks_compile_to_vector_code() -> None:
    """MHE's walks (s = 2 and s = 1, half and full space) divide eight or sixteen entries at a time, and
    with glibc's vector math library the log, power and Gaussian walks call its vector functions.

    Without ``-fno-trapping-math`` GCC kept the clamps as branches and divided one entry at a time
    (``vdivss`` only): 5x slower on AMD Zen 3; without libmvec ``logf``/``powf``/``expf`` ran one entry
    at a time, 2.4-5x slower (the values differ only by rounding, checked by the parity cases).
    """
    library = _cpu_pairs._build(_cpu_pairs._compiler())  # type: ignore[arg-type]
    listing = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    packed: set[str] = set()
    vector_calls: set[str] = set()
    name = ""
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(\w+)>:$", line)
        if header:
            name = header.group(1)
        elif re.search(r"\sv?divps\s", line):
            packed.add(name)
        elif re.search(r"<_ZGV\w+_(expf|logf|powf)@plt>", line):
            vector_calls.add(name)
    spaces = ("h", "f")
    divisions = [
        f"{walk}_{case}_{space}_g"
        for walk in ("values", "slopes")
        for case in ("inverse_square", "inverse")
        for space in spaces
    ]
    assert sorted(set(divisions) - packed) == []
    if ctypes.util.find_library("mvec") is not None:
        calls = [
            f"{walk}_{space}_g"
            for walk in ("values_log", "values_power", "values_gaussian", "slopes_power", "slopes_gaussian")
            for space in spaces
        ]
        assert sorted(set(calls) - vector_calls) == []


@needs_compiler
@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.machine() != "x86_64", reason="x86-64 Linux")
def test_without_the_vector_math_library_the_kernel_is_built_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A libmvec without one of the vector functions for this CPU (here: the linker sends the calls of
    ``expf``'s vector forms to ``__wrap_...`` symbols that exist nowhere) leaves it undefined; the
    shipped flags make that a failed link, and the build is repeated with the scalar functions,
    instead of a library that would fail to load."""
    monkeypatch.setenv(_cpu_pairs.CACHE_ENV, str(tmp_path))
    vector_expf = ("_ZGVbN4v_expf", "_ZGVcN8v_expf", "_ZGVdN8v_expf", "_ZGVeN16v_expf")
    missing = (*_cpu_pairs.VECTOR_MATH, *(f"-Wl,--wrap={name}" for name in vector_expf))
    monkeypatch.setattr(_cpu_pairs, "VECTOR_MATH", missing)
    library = _cpu_pairs._build(_cpu_pairs._compiler())  # type: ignore[arg-type]
    assert library.parent == tmp_path
    assert b"_ZGV" not in library.read_bytes()
    assert ctypes.CDLL(str(library)).pair_block_sums_f32 is not None


@needs_compiler
def test_a_block_with_strided_columns_is_walked_through_a_copy() -> None:
    """The C loops need contiguous rows: a transposed block gives the same sums and gets its coefficients back."""
    assert _cpu_pairs.ready()
    w = torch.nn.functional.normalize(torch.randn(1, 40, 6, generator=torch.Generator().manual_seed(1)), dim=-1)
    gram = w @ w.transpose(1, 2)
    sq = torch.ones(1, 40)
    dense = gram.clone()
    strided = gram.clone().transpose(1, 2)  # the same symmetric values, column stride 40
    kernel = RieszKernel(2.0)
    expected = _cpu_pairs.pair_block_sums(dense, 0, kernel, half_space=True, sq=sq, with_grad=True, width=7)
    got = _cpu_pairs.pair_block_sums(strided, 0, kernel, half_space=True, sq=sq, with_grad=True, width=7)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(strided, dense)


@needs_compiler
def test_a_layer_of_up_to_2048_neurons_is_one_block_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernel a CPU layer is one block up to 2048 neurons (the eager passes: 512); float64
    and a switched-off kernel keep the strips."""
    kernel = RieszKernel(2.0)
    monkeypatch.delenv(pairwise.CPU_KERNEL_ENV, raising=False)
    assert pairwise._schedule(torch.zeros(1, 2048, 3), kernel, None, None) == (2048, None)
    assert pairwise._schedule(torch.zeros(1, 2049, 3), kernel, None, None)[0] < 2049
    assert pairwise._schedule(torch.zeros(1, 2048, 3, dtype=torch.float64), kernel, None, None)[0] == 256
    monkeypatch.setenv(pairwise.CPU_KERNEL_ENV, "0")
    assert pairwise._schedule(torch.zeros(1, 2048, 3), kernel, None, None)[0] == 256


Pair = tuple[torch.Tensor, torch.Tensor]


def _with_and_without_the_kernel(
    fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> tuple[Pair, Pair]:
    """``fn``'s value and gradient at ``w``, with the compiled kernel and with the eager passes."""

    def value_and_grad() -> Pair:
        leaf = w.clone().requires_grad_()
        value = fn(leaf)
        value.backward()
        assert leaf.grad is not None
        return value.detach(), leaf.grad

    monkeypatch.delenv(pairwise.CPU_KERNEL_ENV, raising=False)
    fused = value_and_grad()
    monkeypatch.setenv(pairwise.CPU_KERNEL_ENV, "0")
    return fused, value_and_grad()


@needs_compiler
def test_a_training_step_with_the_kernel_equals_the_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer of 1024 x 512 through the public function: the kernel's one block against the eager
    strips, value and gradient, with the machine's threads."""
    w = torch.randn(1024, 512, generator=torch.Generator().manual_seed(2))
    fused, eager = _with_and_without_the_kernel(lambda x: hyperspherical_energy(x, half_space=True), w, monkeypatch)
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-4, atol=1e-5 * float(eager[1].abs().max()))


# ---- hard MHS's search for the closest pairs ---------------------------------------------------------
def _pair_set(rows: torch.Tensor, cols: torch.Tensor, signs: torch.Tensor, mult: torch.Tensor) -> list[tuple]:
    return sorted(zip(rows.tolist(), cols.tolist(), signs.tolist(), mult.tolist(), strict=True))


@needs_compiler
@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("case", ["random", "duplicate", "antipodal", "orthonormal"])
def test_the_closest_pair_search_finds_what_the_eager_search_finds(case: str, half_space: bool) -> None:
    """The largest cosine and the tied pairs of one Gram matrix, C against the eager blocks; the
    orthonormal frame ties every pair (more than the first buffer of 4n holds)."""
    from lightning_hsu.functional.pairwise import largest_pair_cosine
    from lightning_hsu.functional.separation import _tied_pairs

    n = 64
    w = torch.randn(n, 64, generator=torch.Generator().manual_seed(4))
    if case == "orthonormal":
        w = torch.linalg.qr(w)[0] * 3.0
    elif case == "duplicate":
        w[9] = w[4]
    elif case == "antipodal":
        w[9] = -w[4]
    r = torch.linalg.vector_norm(w, dim=1, keepdim=True).reciprocal()
    eager = (w @ w.T).mul_(r).mul_(r.T)
    ours = w @ w.T
    below = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)
    ours[below] = float("nan")  # below the diagonal is neither read nor written
    c_max = _cpu_pairs.scale_and_largest_cosine(ours, r, half_space=half_space)
    # the same products, in the same order, in the upper triangle
    torch.testing.assert_close(ours.triu(), eager.triu(), rtol=0.0, atol=0.0)
    assert ours[below].isnan().all()
    assert c_max == float(largest_pair_cosine([(0, eager.unsqueeze(0))], half_space=half_space)[0])
    threshold = c_max - 1e-6
    found = _cpu_pairs.tied_pairs(ours, threshold, half_space=half_space)
    expected = _tied_pairs([(0, eager.unsqueeze(0))], threshold, half_space=half_space)
    assert _pair_set(*found) == _pair_set(*expected)
    if case == "orthonormal":
        assert len(found[0]) == (n * (n - 1) if half_space else n * (n - 1) // 2)


@needs_compiler
@pytest.mark.parametrize("where", [(1, 3), (2, 2)], ids=["pair", "self"])
def test_a_nan_makes_the_largest_cosine_nan(where: tuple[int, int]) -> None:
    gram = torch.eye(5)
    gram[where] = float("nan")  # a NaN neuron's row and column: the upper triangle holds one of each pair
    assert torch.isnan(torch.tensor(_cpu_pairs.scale_and_largest_cosine(gram, torch.ones(5), half_space=False)))


@needs_compiler
@pytest.mark.parametrize("d", [64, 512], ids=["one-product", "strips"])
@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
def test_hard_separation_with_the_kernel_equals_the_eager_search(
    half_space: bool, d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the public function, a 600 x d layer with a duplicate pair: value and gradient (at d = 512 the Gram
    matrix comes in strips, unmirrored for the kernel)."""
    from lightning_hsu.functional import hyperspherical_separation

    w = torch.randn(600, d, generator=torch.Generator().manual_seed(5))
    w[17] = w[3]
    fused, eager = _with_and_without_the_kernel(
        lambda x: hyperspherical_separation(x, half_space=half_space), w, monkeypatch
    )
    torch.testing.assert_close(fused[0], eager[0], rtol=0.0, atol=0.0)
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-6, atol=0.0)


def test_a_tensor_off_the_cpu_never_takes_the_compiled_kernel() -> None:
    """Hard MHS asks for the CPU search before its Gram matrix exists: a CUDA (here: meta) tensor keeps the eager
    search instead of reaching the C library with a device pointer."""
    assert pairwise._cpu_kernel(torch.empty(8, 8, device="meta")) is None


@needs_compiler
def test_the_gram_matrix_for_the_compiled_search_is_not_mirrored(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernel the strips' lower triangle is left unwritten (the search reads the upper one); without it, the
    eager search gets the full symmetric matrix."""
    from lightning_hsu.functional import _matmul, hyperspherical_separation, separation

    mirrors: list[bool] = []
    original = _matmul.gram
    monkeypatch.setattr(
        separation, "gram", lambda rows, mirror=True: mirrors.append(mirror) or original(rows, mirror=mirror)
    )
    w = torch.randn(600, 512, generator=torch.Generator().manual_seed(2))
    assert _matmul.gram_in_strips(w.unsqueeze(0))
    hyperspherical_separation(w, half_space=True)
    monkeypatch.setenv(pairwise.CPU_KERNEL_ENV, "0")
    hyperspherical_separation(w, half_space=True)
    assert mirrors == [False, True]
    upper = original(w.unsqueeze(0), mirror=False)[0]
    full = original(w.unsqueeze(0))[0]
    assert torch.equal(upper.triu(), full.triu())
