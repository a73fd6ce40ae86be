r"""The pair-sum kernel's elementwise passes fused into one C loop per block (CPU, float32).

The eager pair sum (`lightning_hsu.functional.pairwise`) evaluates a block of Gram entries in a dozen
or more ATen passes (the kernel at \(c\) and \(-c\), the clamps, the half-space pairing, the self
pairs, the folded projection, sums and copies), each a Python call and a trip through memory. On a
layer with few inputs (\(d = 512\)) those passes cost as much as a third of the products' time at
one thread, and do not halve when the products take two threads (`docs/performance.md`, item 43).
This module computes the same thing as the fused Triton kernel (`_triton_pairs`, whose docstring
states the mathematics) in one C function per block: each row is walked twice from the first-level
cache, once for the sums of the pair terms and \(\rho_i = \sum_j C_{ij} c_{ij}\), once to write the
coefficients \(C''\) over the Gram entries. Hard MHS's search for its closest pairs
(`separation._closest_pairs_sum`) is two more functions of the same library: one pass over the
Gram matrix's upper triangle that scales it to cosines and finds the largest
(`scale_and_largest_cosine`), one that lists the pairs tied with it (`tied_pairs`), where the
eager search made about ten. `mirror_block` writes `_matmul.gram`'s lower triangle from its upper
strips in cache-sized tiles (ATen's transposed copy took 3.5 ns per entry on power-of-two rows).

**Build.** ``_cpu_pairs.c`` ships with the package and is compiled at its first use in a process
with the machine's C compiler (``$CC``, else ``cc``; about a second, for this CPU:
``-march=native``), into a cache directory (``$LIGHTNING_HSU_CACHE_DIR``, else
``$XDG_CACHE_HOME/lightning_hsu`` or ``~/.cache/lightning_hsu``), keyed by the source, the
compiler, its flags and the CPU's feature flags; later processes load the cached library. On Linux
it is linked with glibc's vector math library (`VECTOR_MATH`) where there is one, and built
without it otherwise. It needs no Python or Torch header, and is called through `ctypes` (which
releases the GIL). Where no compiler is found, the build fails, or the library computes a probe
block wrongly (`ready`), the pair sums keep the eager passes, with one warning.
``LIGHTNING_HSU_CPU_KERNEL=0`` keeps them without trying.

**Threads.** A call over at least `PARALLEL_MIN_ENTRIES` entries takes
`_matmul.threads_of_last_product`: all of the caller's threads, unless the latest product ran on one because
the product chooser has seen a load (a busy core) or because one thread is its size class's own choice (item 68);
after a one-thread probe of a class that keeps all threads, with no load seen, all. Its rows are then
claimed a grain at a time by the threads of the OpenMP team Torch's own operations run on: the library
links no OpenMP runtime, and is handed the ``GOMP_parallel`` entry of the one Torch loaded
(`_openmp_runtime`), so no second pool competes for the cores (a pool of its own measured slower than one
thread: Torch's idle OpenMP thread spins on the other core after each product, ``docs/performance.md``
item 45). Where
Torch runs on another thread pool or none is found, every call stays on the calling thread. Each
row's results do not depend on the thread that walks it: the results are bit-identical at any
thread count.

**Numerics.** The formulas and clamps are those of `kernels` in float32, with the same order of
operations where it matters (the scaled cosine \((g_{ij} r_i) r_j\), the clamp that keeps a NaN);
the sums are in another order (per row, then in float64), i.e. they differ from the eager path's in
float32 rounding. The parity tests (``tests/functional/test_cpu_pairs.py``) compare value and
gradient with the eager path and a float64 statement of each formula.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from lightning_hsu.functional import _switches
from lightning_hsu.functional._fused_family import launch_parameters, supports
from lightning_hsu.functional._matmul import cpuinfo_field, threads_of_last_product
from lightning_hsu.functional.kernels import MIN_SQUARED_DISTANCE, PairKernel, RieszKernel

__all__ = [
    "mirror_block",
    "pair_block_sums",
    "ready",
    "scale_and_largest_cosine",
    "supports",
    "takes",
    "team_thread_ids",
    "tied_pairs",
]

#: The C source, shipped beside this module.
SOURCE = Path(__file__).with_name("_cpu_pairs.c")
#: Environment variable naming the directory of the compiled library.
CACHE_ENV = "LIGHTNING_HSU_CACHE_DIR"
#: Compiler flags: vectorised for this CPU, ``-fopenmp-simd`` for the loops' reductions (no OpenMP
#: runtime is linked), no ``errno`` so that the math functions vectorise, no trapping math so that
#: the clamps become selects and the walks vectorise at all (GCC 12 kept them as branches and
#: divided one entry at a time, 5x slower); no fast-math, and no contraction into fused
#: multiply-adds, which rounds otherwise than the eager passes (a shifted Gaussian's exponent: 4x
#: the eager gradient's error where duplicate neurons cancel).
FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp-simd",
    "-fPIC",
    "-shared",
    f"-DMIN_SQ={MIN_SQUARED_DISTANCE!r}f",  # the clamp of `kernels`, one value for both paths
)
#: glibc's vector math library (libmvec), tried first on Linux: the log, power and Gaussian walks
#: call its 8- or 16-wide ``logf``/``powf``/``expf`` (at most 4 ulp, where the scalar ones are at
#: most 1) instead of one entry at a time; without it (another C library, or a libmvec without one
#: of the three for this CPU, which ``--no-undefined`` turns into a failed link rather than a
#: library that fails to load) the build is repeated without them.
VECTOR_MATH = ("-DWITH_LIBMVEC", "-lmvec", "-Wl,--no-undefined")
#: The dtypes `mirror_block` copies (its C loops for 4- and 8-byte floats).
MIRROR_DTYPES = (torch.float32, torch.float64)
#: Fewest Gram entries of a call shared between threads: below, one thread (waking a sleeping
#: OpenMP thread takes tens of microseconds).
PARALLEL_MIN_ENTRIES = 2**16
#: Seconds a compilation may take before the eager passes are kept.
COMPILE_TIMEOUT = 120.0


def _compiler() -> list[str] | None:
    """The C compiler command: ``$CC``, else Python's build compiler, else ``cc``; ``None`` if absent."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc"):
        if not candidate:
            continue
        command = candidate.split()
        if shutil.which(command[0]):
            return command
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and its CPU's feature flags."""
    flags = cpuinfo_field(("flags", "Features")) or ""  # x86's name, ARM's
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_hsu"


def _build(compiler: list[str]) -> Path:
    """The compiled library's path, compiling it if the cache has none for this source, compiler and CPU."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [SOURCE.read_text(), " ".join(compiler), version, " ".join(FLAGS + VECTOR_MATH), _cpu_signature()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable home: a per-user directory under the temporary one
        directory = Path(tempfile.gettempdir()) / f"lightning_hsu-{os.getuid() if hasattr(os, 'getuid') else 0}"
        directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"cpu_pairs-{key}.so"
    if library.exists():
        return library
    # compiled under a unique name and renamed: ranks of one job may build at the same time
    fd, partial = tempfile.mkstemp(suffix=".so", prefix="cpu_pairs-", dir=directory)
    os.close(fd)
    try:
        attempts = [VECTOR_MATH, ()] if sys.platform.startswith("linux") else [()]
        for index, extra in enumerate(attempts):
            try:
                subprocess.run(
                    [*compiler, *FLAGS, "-o", partial, str(SOURCE), *extra, "-lm"],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=COMPILE_TIMEOUT,
                )
                break
            except subprocess.CalledProcessError:
                if index == len(attempts) - 1:
                    raise
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


_POINTER = ctypes.c_void_p
_INT = ctypes.c_int64


def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime that Torch's intra-op pool runs on (Linux: found among the loaded libraries), or ``None``:
    the kernel's calls then stay on the calling thread."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "omp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return None
    for path in sorted(paths):
        if not os.path.basename(path).startswith(("libgomp", "libomp", "libiomp")):
            continue
        try:
            runtime = ctypes.CDLL(path)  # loaded already: the same library, not a second runtime
            runtime.GOMP_parallel, runtime.omp_get_thread_num  # noqa: B018 - both entries must be there
        except (OSError, AttributeError):
            continue
        return runtime
    return None


def attach_openmp_runtime(lib: ctypes.CDLL) -> None:
    """Give the library Torch's OpenMP runtime (`_openmp_runtime`) to share calls' rows with its pool."""
    runtime = _openmp_runtime()
    if runtime is not None:
        lib.use_openmp_runtime(
            ctypes.cast(runtime.GOMP_parallel, _POINTER), ctypes.cast(runtime.omp_get_thread_num, _POINTER)
        )


@functools.cache
def _library() -> ctypes.CDLL:
    """The loaded library (built on first use); raises what the build or the loader raised."""
    compiler = _compiler()
    if compiler is None:
        raise FileNotFoundError("no C compiler found ($CC, Python's CC, cc)")
    lib = ctypes.CDLL(str(_build(compiler)))
    fn = lib.pair_block_sums_f32
    fn.restype = ctypes.c_int
    # gram, batch, rows, m, stride_gb, stride_gr, sq, row_scale, col_scale, param, param_stride,
    # diag, width, kind, power_case, power, two_t, half, with_grad, out
    fn.argtypes = [_POINTER, _INT, _INT, _INT, _INT, _INT, _POINTER, _POINTER, _POINTER, _POINTER, _INT]
    fn.argtypes += [_INT, _INT, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_int]
    fn.argtypes += [ctypes.c_int, _POINTER, ctypes.c_int]
    lib.scale_and_largest_f32.restype = ctypes.c_float
    lib.scale_and_largest_f32.argtypes = [_POINTER, _INT, _INT, _POINTER, ctypes.c_int, ctypes.c_int]
    lib.tied_pairs_f32.restype = _INT
    lib.tied_pairs_f32.argtypes = [_POINTER, _INT, _INT, ctypes.c_float, ctypes.c_int, _POINTER, _POINTER, _POINTER]
    lib.tied_pairs_f32.argtypes += [_INT, ctypes.c_int]
    lib.rows_walked_by_helpers.restype = _INT
    lib.rows_walked_by_helpers.argtypes = []
    lib.mirror_block.restype = ctypes.c_int
    lib.mirror_block.argtypes = [_POINTER, _INT, _INT, _INT, _INT, _INT, _INT, _INT, _INT, ctypes.c_int]
    lib.team_thread_ids.restype = _INT
    lib.team_thread_ids.argtypes = [_POINTER, _INT]
    lib.use_openmp_runtime.restype = None
    lib.use_openmp_runtime.argtypes = [_POINTER, _POINTER]
    attach_openmp_runtime(lib)
    return lib


#: Whether the library built, loaded and passed the probe (`ready`): empty before the first try.
_READY: list[bool] = []


def _probe() -> None:
    """One 2 x 2 block of half-space MHE (s = 2) against its closed form, value and coefficients."""
    c = 0.25
    block = torch.tensor([[[1.0, c], [c, 1.0]]])
    pair, tile, anti = pair_block_sums(
        block, 0, RieszKernel(2.0), half_space=True, sq=torch.ones(1, 2), with_grad=True, width=1
    )
    # each row: f(c) + f(-c) = 1/(2 - 2c) + 1/(2 + 2c); the antipodal pair f(-1) = 1/4
    expected_pair = 2.0 * (1.0 / (2 - 2 * c) + 1.0 / (2 + 2 * c))
    # C_01 = 2 (f'(c) - f'(-c)) with f'(c) = 2 / (2 - 2c)^2; C_00 = -2 f'(-1) = -2 * 2/16
    coeff = 2.0 * (2.0 / (2 - 2 * c) ** 2 - 2.0 / (2 + 2 * c) ** 2)
    expected = torch.tensor([[[-0.25, coeff], [coeff, -0.25]]])
    ok = abs(float(pair) - expected_pair) < 1e-5 and abs(float(anti) - 0.5) < 1e-6
    ok = ok and abs(float(tile) - expected_pair / 2) < 1e-5 and torch.allclose(block, expected, atol=1e-6)
    if not ok:
        raise RuntimeError(f"the compiled kernel computed a probe block wrongly ({float(pair)}, {block.tolist()})")


def ready() -> bool:
    """Whether the C kernel is built, loaded and computes a probe block right: tried once per process.

    Where it is not, the pair sums keep the eager passes and one warning says why.
    """
    if not _READY:
        try:
            _library()
            _READY.append(True)
            _probe()
        except Exception as err:  # no compiler, a failed build or load, a wrong probe: the eager path stays correct
            _READY[:] = [False]
            detail = getattr(err, "stderr", None) or ""
            warnings.warn(
                f"the compiled CPU pair-sum kernel is unavailable ({type(err).__name__}: {err}"
                f"{'; ' + detail.strip()[-500:] if detail else ''}); the pair sums use the eager passes",
                RuntimeWarning,
                stacklevel=2,
            )
    return _READY[0]


def _threads(entries: int) -> int:
    """How many threads a call over ``entries`` Gram entries takes: one for a small call, else
    `_matmul.threads_of_last_product` (all on an idle machine, one on a busy core)."""
    return 1 if entries < PARALLEL_MIN_ENTRIES else threads_of_last_product()


def _float32_contiguous(x: Tensor) -> Tensor:
    return x.detach().to(torch.float32).contiguous()


def pair_block_sums(
    block: Tensor,
    diag: int,
    kernel: PairKernel,
    *,
    half_space: bool,
    sq: Tensor,
    with_grad: bool,
    row_scale: Tensor | None = None,
    col_scale: Tensor | None = None,
    width: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Sums of a block's pair terms, and its gradient coefficients written over it, in one C call.

    The arguments and results of `_triton_pairs.pair_block_sums`: ``block`` is a ``[batch, rows, m]``
    float32 CPU tensor of Gram entries (the self pair of row ``k`` at column ``k + diag``),
    overwritten with the coefficients when ``with_grad``; ``sq`` the ``[batch, rows]`` squared
    norms \(\lVert\hat w_i\rVert^2\); ``row_scale`` (``[batch, rows]``) folds the projection onto
    the sphere into the coefficients; ``col_scale`` (``[batch, m]``, with ``row_scale``) marks
    raw products; ``width`` the leading columns summed apart. Returns the ``[batch]`` sums of the
    pair terms, of those in the leading ``width`` columns, and of the antipodal terms.
    """
    batch, rows, m = block.shape
    kind, power_case, power, two_t, param, stride_p = launch_parameters(block, kernel, row_scale, col_scale)
    if block.dtype != torch.float32 or block.device.type != "cpu":
        raise ValueError(f"the CPU kernel takes float32 CPU blocks, got {block.dtype} on {block.device}")
    target = block
    if rows and m and block.stride(2) != 1:
        target = block.contiguous()  # the C loops walk contiguous rows
    sq = _float32_contiguous(sq)
    rows_scale = None if row_scale is None else _float32_contiguous(row_scale)
    cols_scale = None if col_scale is None else _float32_contiguous(col_scale)
    out = torch.zeros(3, batch, rows, dtype=torch.float64)
    if rows and m:
        threads = _threads(batch * rows * m)
        _library().pair_block_sums_f32(
            target.data_ptr(),
            batch,
            rows,
            m,
            target.stride(0),
            target.stride(1),
            sq.data_ptr(),
            None if rows_scale is None else rows_scale.data_ptr(),
            None if cols_scale is None else cols_scale.data_ptr(),
            param.data_ptr(),
            stride_p,
            diag,
            m if width is None else width,
            kind,
            power_case,
            power,
            two_t,
            int(bool(half_space)),
            int(bool(with_grad)),
            out.data_ptr(),
            threads,
        )
    if with_grad and target is not block:
        block.copy_(target)
    pair, tile, anti = out.sum(2).to(block.dtype)
    return pair, tile, anti


def takes(tensor: Tensor) -> bool:
    """Whether the compiled library takes ``tensor``: a CPU tensor with storage to hand over (not functorch's
    wrappers or fake tensors), `_switches.CPU_KERNEL` not ``0``, and the library built (`ready`)."""
    if _switches.CPU_KERNEL.read() == "0" or tensor.device.type != "cpu":
        return False
    try:
        tensor.data_ptr()
    except RuntimeError:
        return False
    return ready()


def mirror_block(matrices: Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> None:
    r"""Copy the entries \((i, j)\), \(i\) in ``rows``, \(j\) in ``cols``, \(j > i\), of each
    ``[batch, n, n]`` float32 or float64 matrix to \((j, i)\), in place: `_matmul.gram`'s mirroring.

    In tiles that stay in the first-level cache (ATen's copy of a transposed view does not, on
    power-of-two rows); on `_threads` threads. The rows must be contiguous (column stride 1).
    """
    batch, n, m = matrices.shape
    if matrices.dtype not in MIRROR_DTYPES or matrices.stride(2) != 1 or n != m:
        raise ValueError(
            f"mirror_block takes [batch, n, n] float32 or float64 matrices with contiguous rows, got "
            f"{matrices.dtype} of shape {tuple(matrices.shape)} and strides {matrices.stride()}"
        )
    (r0, r1), (c0, c1) = rows, cols
    if not (0 <= r0 <= r1 <= n and 0 <= c0 <= c1 <= n):
        raise ValueError(f"mirror_block: rows {rows} or columns {cols} fall outside a {n} x {n} matrix")
    _library().mirror_block(
        matrices.data_ptr(),
        matrices.element_size(),
        batch,
        matrices.stride(1),
        matrices.stride(0),
        r0,
        r1,
        c0,
        c1,
        _threads(batch * (r1 - r0) * (c1 - c0)),
    )


def team_thread_ids(threads: int) -> list[int]:
    """The operating system's thread ids of Torch's OpenMP team of ``threads``, the caller's first (Linux, where the
    library shares its rows with that team: `_openmp_runtime`); empty elsewhere (`_runnable_tasks`)."""
    if threads < 1:
        return []
    ids = torch.empty(threads, dtype=torch.int64)
    written = int(_library().team_thread_ids(ids.data_ptr(), threads))
    return [int(i) for i in ids[:written]]


def rows_walked_by_helpers() -> int:
    """How many rows threads other than the calling one have walked in this process (for the tests)."""
    return int(_library().rows_walked_by_helpers())


def _square_cosines(gram: Tensor) -> None:
    n = gram.shape[0]
    if gram.dtype != torch.float32 or gram.device.type != "cpu" or gram.shape != (n, n) or gram.stride(1) != 1:
        raise ValueError(f"the CPU search takes an n x n float32 CPU matrix with contiguous rows, got {gram.shape}")


def scale_and_largest_cosine(gram: Tensor, r: Tensor, *, half_space: bool) -> float:
    r"""Scale the upper triangle \(j \ge i\) of the Gram matrix of raw rows to cosines in place,
    \((g_{ij} r_i) r_j\), and return the largest pair cosine: `pairwise.largest_pair_cosine` of the
    scaled (symmetric) matrix, in the same pass (NaN if any entry is NaN). The entries below the
    diagonal are neither read nor written (`_matmul.gram` with ``mirror=False``). ``gram``:
    ``[n, n]`` float32, rows contiguous; ``r``: the ``n`` factors."""
    _square_cosines(gram)
    factors = _float32_contiguous(r).reshape(-1)
    n = gram.shape[0]
    threads = _threads(n * n // 2)
    return float(
        _library().scale_and_largest_f32(gram.data_ptr(), n, gram.stride(0), factors.data_ptr(), half_space, threads)
    )


def tied_pairs(cos: Tensor, threshold: float, *, half_space: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""`separation._tied_pairs` of one ``[n, n]`` float32 cosine matrix in one pass over its upper
    triangle: the rows, columns, signs and multiplicities of the pairs whose cosine reaches
    ``threshold`` (half space: \(\pm c_{ij}\) twice each, the antipodal \(-c_{ii}\) once)."""
    _square_cosines(cos)
    n = cos.shape[0]
    capacity = 4 * n
    threads = _threads(n * n // 2)
    while True:
        rows = torch.empty(capacity, dtype=torch.int64)
        cols = torch.empty(capacity, dtype=torch.int64)
        signs = torch.empty(capacity, dtype=torch.float32)
        count = int(
            _library().tied_pairs_f32(
                cos.data_ptr(),
                n,
                cos.stride(0),
                threshold,
                half_space,
                rows.data_ptr(),
                cols.data_ptr(),
                signs.data_ptr(),
                capacity,
                threads,
            )
        )
        if count < 0:
            raise MemoryError(f"the closest-pair search could not allocate {n} bytes")
        if count <= capacity:
            break
        capacity = count  # many ties (duplicate neurons): once more with room for all
    rows, cols, signs = rows[:count], cols[:count], signs[:count]
    mult = torch.where(rows == cols, 1.0, 2.0) if half_space else torch.ones(count)
    return rows, cols, signs, mult
