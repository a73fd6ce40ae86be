r"""Matrix products of the pair sums, on the fastest exact float32 path of the device.

Why this module exists: on the CPU, ``torch.bmm``/``torch.mm`` in float32 call MKL's ``sgemm``,
while a network's convolutions and ``Linear`` layers under ``torch.compile`` run through oneDNN.
On the AMD EPYC (Zen 5) machine of ``docs/performance.md`` MKL reaches about 100 GFLOP/s per core,
less than half of the float32 peak that oneDNN reaches there (the 512 × 4608 Gram product: 23.6 ms
against 10.4 ms on one thread), so a penalty made of MKL products costs twice what it should next
to the network it regularises. oneDNN's float32 matrix product is the one PyTorch's inductor
emits for ``Linear`` (``torch.ops.mkldnn._linear_pointwise``); it computes in float32 (its error
against float64 is that of ``torch.mm``, checked in ``tests/functional/test_matmul.py``).

The products here are used only inside the pair-sum Functions, which form their gradient in
closed form, so they never need autograd. Anything the oneDNN path does not take — another device,
float64, a tensor that requires a gradient while grad mode is on, a product traced by
``torch.compile``, a PyTorch without the operator, a CPU other than x86-64 (not measured) — goes
to ``torch.bmm``.

oneDNN's advantage is AVX-512 on CPUs for which MKL does not use it, so ``torch.bmm`` is the
default everywhere else. On Intel CPUs MKL is tuned for them, and oneDNN's linear, which copies
each call's weight operand into its own layout, was no faster on any product of the pair sums and
up to 2.3x slower on the thin and the transposed ones (CPU C of ``docs/performance.md``, an Intel
Xeon with AVX-512: with oneDNN, half-space MHE at 512 x 4608 took 1.34x and CoMHE at 1024 x 512
1.39-1.50x MKL's time). On an AMD CPU without AVX-512 (CPU D, Zen 3) both libraries use AVX2 and
oneDNN took 1.01-1.27x MKL's time per penalty at one thread, 1.00-1.34x at two. The variable
``LIGHTNING_HSU_ONEDNN_MATMUL`` chooses: ``1`` oneDNN wherever it is available, ``0``
``torch.bmm`` everywhere (values then differ in the last float32 bits only), unset or ``auto``
as above: oneDNN on a CPU with AVX-512 that is not Intel's.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import threading
from collections.abc import Callable, Iterator
from typing import Literal, ParamSpec, TypeVar, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_hsu.functional import _product_threads as _product_threads_module
from lightning_hsu.functional import _switches

#: Environment variable choosing the CPU products' library (`_switches.ONEDNN_MATMUL`).
ONEDNN_ENV = _switches.ONEDNN_MATMUL.name
#: Rows per strip of `gram` on the CPU. Thinner strips lose matrix-multiply speed; measured
#: (``benchmarks/bench_kernels.py``, 2 threads): 512 x 4608 in strips of 128 rows takes 0.70 of the
#: full product, 256 x 2304 0.87, 256 x 1152 and 128 x 1152 gain nothing.
GRAM_STRIP_ROWS = 128
#: Smallest row length for which `gram` works in strips (below it the product is too small), and
#: smallest size of the rows, in entries. Measured on CPU B (AMD Zen 4), strips and mirror over the
#: full product, at one and two threads: 0.69-0.91 for 512 to 4096 rows of 512 entries,
#: 0.87-0.98 for 256 x 1024, 0.80-1.14 for rows of 256 entries, 1.2-2.6 for rows of 64.
GRAM_STRIP_MIN_COLUMNS = 512
GRAM_STRIP_MIN_ELEMENTS = 2**18
#: Entries of the output per oneDNN product in `matmul_into` (bounds its temporary to
#: 16 MiB of float32; fewer, larger products than a fixed 1024 rows, each a barrier of the pool).
MATMUL_INTO_ELEMENTS = 2**22
#: Largest weight operand of one oneDNN call (16 MiB of float32), which oneDNN copies per call.
WEIGHT_BLOCK_ELEMENTS = 2**22
#: The product kind (`_product_threads`) of oneDNN's float32 products.
ONEDNN_KIND = "torch.float32 onednn"
#: Products whose inner dimension is below this are a kind of their own (`product_kind`): their output,
#: not their multiply-adds, sets their time. CoMHE's Gram products of 40-dimensional projections took
#: 2.4x the time per multiply-add of its gradient products of the same size class, and one class holding
#: both flipped its choice on which of them its last three measurements were (CPU D, item 57).
THIN_PRODUCT_DEPTH = 64
#: Whether `passes_on_one_thread` narrows the intra-op pool (``False``: every pass uses the
#: caller's threads, as before; kept for the ablation in ``benchmarks/bench_contention.py``).
SERIAL_PASSES = True
#: Whether `passes_on_product_threads` gives its passes the latest product's threads (``False``: they
#: stay on one thread, as before item 55; kept for the ablation in ``benchmarks/bench_contention.py``).
PASSES_FOLLOW_PRODUCTS = True
#: Whether, after a product on one thread, `threads_of_last_product` gives the caller's threads only where that
#: product's size class keeps all threads (its one-thread run was a probe) and no load is marked. ``False``: wherever
#: no load is marked, as before item 68: under a load that lasts, a load seen ending for a moment (two lucky probes)
#: while the classes stayed on one thread sent the compiled kernel's calls to both threads for up to a second, each
#: hard MHS call at 1024 x 512 then 15.4 ms against 8.7 (CPU B).
KERNEL_FOLLOWS_CLASS = True
#: Whether the products of one operation (`gram`'s strips, a batch of oneDNN products, `matmul_into`'s pieces) choose
#: their threads once, as a group (`product_group`): one choice and one measurement for the operation, not one per
#: product. A choice costs the chooser's Python, about 10 us right after a product has evicted the interpreter's caches
#: (CPU B; hard MHS at 1024 x 512 under a load, eight strips a call: 1.02x its one-thread time grouped, 1.05x not).
#: ``False``: each product on its own, before item 69; kept for ``benchmarks/bench_contention.py``.
PRODUCT_GROUPS = True

#: Operand precisions of the pair sums' products (`product_precision`).
ProductPrecision = Literal["float32", "tf32", "bfloat16"]
PRODUCT_PRECISIONS: tuple[ProductPrecision, ...] = ("float32", "tf32", "bfloat16")

_scope = threading.local()
P = ParamSpec("P")
R = TypeVar("R")


def _narrows_pool(device: torch.device) -> bool:
    """Whether `passes_on_one_thread` on ``device`` narrows the pool here (not already inside it)."""
    if not SERIAL_PASSES or device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return torch.get_num_threads() > 1 and getattr(_scope, "threads", None) is None


@contextlib.contextmanager
def passes_on_one_thread(device: torch.device) -> Iterator[None]:
    """Run the elementwise passes inside on the calling thread; the products here choose their threads.

    On the CPU each parallel ATen operation ends at the intra-op pool's barrier. A pair sum is
    dozens of short passes (the kernel, its slope, the folded projection, sums, copies) and a few
    long products: on a core shared with another process each pass waits for the descheduled
    pool thread (milliseconds per pass), while a product is split once. Inside this context the
    pool has one thread, and `batched_matmul`, `matmul_into` and `gram` widen it
    again for a product where that measured faster (`_product_threads`: on an idle machine, not
    on a busy core, where the product library's static split waits too). Nothing changes on other
    devices, at one thread, or under ``torch.compile`` tracing. Nested use keeps the outer setting.
    """
    if not _narrows_pool(device):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _scope.threads = threads
    _scope.last_wide = False
    _scope.last_class_wide = True  # no product yet: the load alone decides
    _scope.group = None
    try:
        yield
    finally:
        _scope.threads = None
        torch.set_num_threads(threads)
        _record_pending_product()


def serial_passes(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` inside `passes_on_one_thread`, on the device of its first tensor argument.

    For the regularisers' own passes outside the pair sums (normalisations, the searches for the
    closest pair, the float64 kernels of MGD, the pole's steps): on a busy core each of them would
    wait at the pool's barrier as the pair sums' passes did.
    """

    @functools.wraps(fn)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        tensor = next((a for a in args if isinstance(a, Tensor)), None)
        if tensor is None:
            return fn(*args, **kwargs)
        with passes_on_one_thread(tensor.device):
            return fn(*args, **kwargs)

    return wrapped


class _OneThreadGraph(torch.autograd.Function):
    """``fn(x)`` with its autograd graph kept inside: forward and backward in `passes_on_one_thread`."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        leaf = x.detach().requires_grad_()
        with torch.enable_grad(), passes_on_one_thread(x.device):
            out = fn(leaf)
        ctx.graph = (leaf, out)  # type: ignore[attr-defined]
        return out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[None, Tensor | None]:
        leaf, out = ctx.graph  # type: ignore[attr-defined]
        if not out.requires_grad:
            return None, None
        with passes_on_one_thread(grad.device):
            # retain_graph: a caller's retain_graph=True may backpropagate again; the graph goes with ctx
            (result,) = torch.autograd.grad(out, leaf, grad, retain_graph=True, allow_unused=True)
        return None, result


def one_thread_graph(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)``, with the passes of its forward **and of its backward** on one thread (CPU).

    `passes_on_one_thread` covers what runs inside a call; a penalty's autograd backward runs
    later, inside ``loss.backward()``, on all threads, each pass a barrier of the pool (MHP's
    penalty took 3.5x its one-thread time at 2 threads with a busy core). Here the forward keeps its
    own graph from ``x`` and the backward replays it inside the context. For penalties of ``x``
    alone: other tensors that require a gradient get none (the regularizers detach the pole and
    their buffers), and it is not twice differentiable. Elsewhere (other devices, one thread,
    no gradient, ``torch.compile`` tracing, inside the context already) it is ``fn(x)``.
    """
    if not (torch.is_grad_enabled() and x.requires_grad and _narrows_pool(x.device)):
        return fn(x)
    return cast(Tensor, _OneThreadGraph.apply(fn, x))


def threads_of_last_product() -> int:
    """The threads for work that follows a product inside `passes_on_one_thread` and should share its choice:
    the caller's threads if the latest product in the context ran on them, or if it ran on one thread only as a
    probe of a size class that keeps all threads (`_product_threads.ProductThreadChooser.keeps_all_threads`) and no
    load is seen (`_product_threads.ProductThreadChooser.loaded`); else one; outside the context, the current
    thread count. (Where a class's own choice is one thread, so is the work after it: on an idle machine that is a
    small product's class, where such work is small too; under a load that lasts, classes stay on one thread while
    a load is seen ending for a moment, item 68.)

    The compiled pair-sum kernel's calls take it (`_cpu_pairs`): the products measure the machine's load well
    (their time runs to the next product, and so includes such a call), where a few short calls of their own
    would decide on noise."""
    threads = getattr(_scope, "threads", None)
    if threads is None:
        return torch.get_num_threads()
    if getattr(_scope, "last_wide", False):
        return threads
    # a one-thread product: a probe of a class that keeps all threads, or the class's own choice
    class_wide = getattr(_scope, "last_class_wide", True) or not KERNEL_FOLLOWS_CLASS
    return threads if class_wide and not _product_threads_module.CHOOSER.loaded else 1


@contextlib.contextmanager
def chosen_threads(work: int, kind: str) -> Iterator[None]:
    """Threads for one product of ``work`` multiply-adds inside `passes_on_one_thread`.

    The caller's threads or one, whichever `_product_threads.CHOOSER` measured faster for
    products of this size and ``kind`` (dtype and library; on a busy core one thread is);
    elsewhere the threads are left as they are. Also for other operations that the library
    splits between threads as it does a product (MGD's Cholesky factorisations, with their
    floating-point operations as ``work`` and a kind of their own). Inside `product_group` a
    product takes the group's threads and is not measured on its own.
    """
    threads = getattr(_scope, "threads", None)
    if threads is None:
        yield
        return
    group: int | None = getattr(_scope, "group", None)
    pending = None if group is not None else _choose(work, kind, threads)
    chosen = pending[0] if pending is not None else cast(int, group)
    around = torch.get_num_threads()  # one, or all inside `passes_on_product_threads`
    if chosen != around:
        torch.set_num_threads(chosen)
    try:
        yield
    finally:
        if chosen != around:
            torch.set_num_threads(around)
    if pending is not None:
        _end_choice(pending)


@contextlib.contextmanager
def product_group(work: int, kind: str) -> Iterator[None]:
    """One choice of threads (`chosen_threads`) for the products inside, ``work`` multiply-adds of ``kind`` in all:
    each product inside runs on them, the passes between on the threads around, and the chooser measures the
    group as one product (`PRODUCT_GROUPS`; nested, the outer group's choice holds)."""
    threads = getattr(_scope, "threads", None)
    if threads is None or not PRODUCT_GROUPS or getattr(_scope, "group", None) is not None:
        yield
        return
    pending = _choose(work, kind, threads)
    _scope.group = pending[0]
    try:
        yield
    finally:
        _scope.group = None
    _end_choice(pending)


_Choice = tuple[int, int, bool, float, str, bool]  # threads, work, wide, start, kind, measured


def _choose(work: int, kind: str, threads: int) -> _Choice:
    """The threads for a product or group inside `passes_on_one_thread`, with what `_end_choice` needs to measure it."""
    chooser = _product_threads_module.CHOOSER
    adaptive = _product_threads_module.adaptive()
    if adaptive:
        _record_pending_product()
    wide = chooser.use_all_threads(work, kind, threads) if adaptive else True
    _scope.last_wide = wide
    _scope.last_class_wide = wide or chooser.keeps_all_threads(work, kind)
    return (threads if wide else 1, work, wide, chooser.clock(), kind, adaptive)


def _end_choice(choice: _Choice) -> None:
    """A product or group has ended: its time runs on to the next one (`_record_pending_product`)."""
    _, work, wide, start, kind, measured = choice
    if measured:
        _scope.pending = (work, wide, start, kind, _product_threads_module.CHOOSER.clock() - start)


@contextlib.contextmanager
def passes_on_product_threads() -> Iterator[None]:
    r"""Inside `passes_on_one_thread`: the passes inside take the threads the latest product took.

    For a few long passes that follow a product (MGD's float64 kernels over the whole
    \(n\times n\) matrix, 8-32 MiB each): each is one barrier of the pool, not dozens, so on an
    idle machine both threads halve them, while on a busy core the product went to one thread
    (`chosen_threads`) and so do they. The products inside still choose their own threads. Outside
    the context, or after a product on one thread, nothing changes.
    """
    threads = getattr(_scope, "threads", None)
    if threads is None or not (PASSES_FOLLOW_PRODUCTS and getattr(_scope, "last_wide", False)):
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def _record_pending_product() -> None:
    """Give the chooser the last product's time, counted up to the next product or the context's end.

    The one-thread passes after an all-thread product run slower while the pool's idle thread
    spins on the other core (measured: 4.3 ms for the next strip instead of 8.3 with a busy core),
    so that slowdown is charged to the product that caused it.
    """
    pending = getattr(_scope, "pending", None)
    if pending is None:
        return
    _scope.pending = None
    work, wide, start, kind, product_seconds = pending
    chooser = _product_threads_module.CHOOSER
    chooser.record(work, wide, chooser.clock() - start, kind, product_seconds)


@contextlib.contextmanager
def product_precision(precision: ProductPrecision) -> Iterator[None]:
    r"""Float32 products of `batched_matmul`, `matmul_into` and `gram` inside, with reduced operands.

    - ``"float32"``: unchanged (the default; on CUDA, TF32 only if the user enabled it globally).
    - ``"tf32"``: operands rounded to TF32 (10 mantissa bits), products accumulated in float32: on
      CUDA by cuBLAS with TF32 allowed for these products only (tensor cores on Ampere and later);
      elsewhere emulated by rounding the operands (round to nearest even; the same numbers up to the
      order of the sums, and slower than float32: useful to measure the error, not to save time).
    - ``"bfloat16"``: operands rounded to bfloat16 (7 mantissa bits), products accumulated in
      float32 and returned in float32: on CUDA by ``torch.bmm(..., out_dtype=torch.float32)`` where
      this PyTorch has it; elsewhere emulated by rounding the operands.

    The pair sums enter this for their own products only (`pairwise`, argument ``precision``);
    nested use keeps the inner setting inside.
    """
    previous = getattr(_scope, "precision", "float32")
    _scope.precision = precision
    try:
        yield
    finally:
        _scope.precision = previous


def _reduced_precision(a: Tensor, b: Tensor) -> ProductPrecision | None:
    """The precision of this product if reduced (float32 operands inside `product_precision`), else ``None``."""
    precision = cast(ProductPrecision, getattr(_scope, "precision", "float32"))
    if precision == "float32" or a.dtype != torch.float32 or b.dtype != torch.float32:
        return None
    return precision


def round_operand(x: Tensor, precision: ProductPrecision) -> Tensor:
    """``x`` (float32) rounded to the operand precision, as a float32 tensor (round to nearest even)."""
    if precision == "bfloat16":
        return x.to(torch.bfloat16).to(torch.float32)
    if precision == "tf32":
        bits = x.contiguous().view(torch.int32)
        # drop the 13 low mantissa bits, rounding to nearest even (a carry may reach the exponent: correct)
        rounded = (bits + (0x0FFF + ((bits >> 13) & 1))) & ~0x1FFF
        return rounded.view(torch.float32).view_as(x)
    return x


@contextlib.contextmanager
def _tf32_products() -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@functools.cache
def _bf16_products_in_float32(device: torch.device) -> bool:
    """Whether ``torch.bmm`` takes bfloat16 operands with a float32 result on ``device`` (tried once)."""
    try:
        ones = torch.ones(1, 2, 2, device=device, dtype=torch.bfloat16)
        return torch.bmm(ones, ones, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _reduced_product(a: Tensor, b: Tensor, precision: ProductPrecision) -> Tensor:
    """``a @ b`` (``[batch, m, k]`` by ``[batch, k, n]``) with operands of ``precision``, in float32."""
    if a.is_cuda and precision == "tf32":
        with _tf32_products():
            return torch.bmm(a, b)
    if a.is_cuda and precision == "bfloat16" and _bf16_products_in_float32(a.device):
        return torch.bmm(a.to(torch.bfloat16), b.to(torch.bfloat16), out_dtype=torch.float32)
    return torch.bmm(round_operand(a, precision), round_operand(b, precision))


def cpuinfo_field(field: str | tuple[str, ...]) -> str | None:
    """The value of the first line of ``/proc/cpuinfo`` starting with ``field`` (or one of several);
    ``""`` where there is none, ``None`` where the file cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith(field):
                    return line.partition(":")[2].strip()
    except OSError:
        return None
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), or ``""`` where it is not known."""
    vendor = cpuinfo_field("vendor_id")
    if vendor is None:
        return "GenuineIntel" if "intel" in platform.processor().lower() else ""
    return vendor


def cpu_has_avx512() -> bool:
    """Whether the CPU has AVX-512 (``avx512f`` among ``/proc/cpuinfo``'s flags)."""
    return "avx512f" in (cpuinfo_field("flags") or "").split()


@functools.cache
def onednn_operator() -> object | None:
    """oneDNN's float32 ``x @ w.T`` if this PyTorch has it and it agrees with ``torch.mm``, else ``None``
    (whether or not the pair sums use it: `onednn_matmul_enabled`)."""
    if not torch.backends.mkldnn.is_available():
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # measured on x86-64 only; elsewhere oneDNN may wrap another backend
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.arange(12.0).view(3, 4)
        ok = torch.equal(op(x, x, None, "none", [], ""), x @ x.T)  # small integers: exact on both paths
    except (AttributeError, RuntimeError):
        return None
    return op if ok else None


@functools.cache
def _onednn_linear() -> object | None:
    """`onednn_operator` where the pair sums' float32 CPU products use it (`ONEDNN_ENV`), else ``None``."""
    choice = _switches.ONEDNN_MATMUL.read()
    if choice == "0" or (choice == "auto" and (cpu_vendor() == "GenuineIntel" or not cpu_has_avx512())):
        return None
    return onednn_operator()


def onednn_matmul_enabled() -> bool:
    """Whether float32 CPU products go through oneDNN in this process (see the module docstring)."""
    return _onednn_linear() is not None


def _takes_onednn(a: Tensor, b: Tensor) -> bool:
    if a.device.type != "cpu" or a.dtype != torch.float32 or b.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False
    if torch.compiler.is_compiling():  # inductor chooses its own kernels for a traced product
        return False
    return _onednn_linear() is not None


def _dense(t: Tensor) -> Tensor:
    """``t`` if each of its matrices is stored densely, row- or column-major, else a contiguous copy.

    oneDNN runs other layouts (a slice of a column-major matrix, say) with a reference kernel
    ~100x slower (measured: 165 ms instead of 1 ms for 256 x 40 @ 40 x 768); the copy costs one
    pass over an operand, the product a pass per row of the other.
    """
    rows, cols = t.shape[-2:]
    row_stride, col_stride = t.stride()[-2:]
    row_major = col_stride == 1 and (row_stride == cols or rows == 1)
    column_major = row_stride == 1 and (col_stride == rows or cols == 1)
    return t if row_major or column_major else t.contiguous()


def _onednn_product(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` for matrices, by oneDNN, over weight blocks of at most
    `WEIGHT_BLOCK_ELEMENTS` entries.

    oneDNN copies (reorders) the weight of each call into its own layout; on a 100,000-neuron
    layer that copy was the size of the layer (195 MiB at d = 512, twice at the peak). A weight
    with many rows is cut into row blocks (columns of the result); one with a long contraction
    into column blocks whose products are summed.
    """
    linear = _onednn_linear()
    rows, inner = weight.shape
    if rows * inner <= WEIGHT_BLOCK_ELEMENTS:
        return linear(_dense(x), _dense(weight), None, "none", [], "")  # type: ignore[operator]
    if inner > rows:
        step = max(1, WEIGHT_BLOCK_ELEMENTS // rows)
        out = _onednn_product(x[:, :step], weight[:, :step])
        for start in range(step, inner, step):
            out.add_(_onednn_product(x[:, start : start + step], weight[:, start : start + step]))
        return out
    step = max(1, WEIGHT_BLOCK_ELEMENTS // inner)
    out = x.new_empty(x.shape[0], rows)
    for start in range(0, rows, step):
        out[:, start : start + step] = _onednn_product(x, weight[start : start + step])
    return out


def product_kind(library: str, depth: int) -> str:
    """The kind under which `_product_threads` measures a product of ``library`` (dtype and library) with
    inner dimension ``depth``: a thin one (`THIN_PRODUCT_DEPTH`) is measured apart."""
    return f"{library}, thin" if depth < THIN_PRODUCT_DEPTH else library


def _kind_of(a: Tensor, b: Tensor) -> str:
    """The kind (`product_kind`) of the product ``a @ b`` of ``[batch, m, k]`` and ``[batch, k, n]`` operands."""
    precision = _reduced_precision(a, b)
    if precision is not None:
        library = f"{precision} bmm"
    elif _takes_onednn(a, b):
        library = ONEDNN_KIND
    else:
        library = f"{a.dtype} bmm"
    return product_kind(library, a.shape[2])


def batched_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``[batch, m, k]`` and ``[batch, k, n]`` (any strides): a new ``[batch, m, n]`` tensor."""
    work = a.shape[1] * a.shape[2] * b.shape[2]  # multiply-adds per matrix
    depth = a.shape[2]
    precision = _reduced_precision(a, b)
    if precision is not None:
        with chosen_threads(a.shape[0] * work, product_kind(f"{precision} bmm", depth)):
            return _reduced_product(a, b, precision)
    if not _takes_onednn(a, b):
        with chosen_threads(a.shape[0] * work, product_kind(f"{a.dtype} bmm", depth)):
            return torch.bmm(a, b)
    weight = b.transpose(1, 2)  # oneDNN's linear is x @ w.T; a transposed view, no copy
    kind = product_kind(ONEDNN_KIND, depth)
    if a.shape[0] == 1:
        x, w = a[0], weight[0]  # views taken on one thread, like every pass around the product
        with chosen_threads(work, kind):
            product = _onednn_product(x, w)
        return product.unsqueeze(0)
    out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
    with product_group(a.shape[0] * work, kind):
        for i in range(a.shape[0]):
            x, w = a[i], weight[i]
            with chosen_threads(work, kind):
                product = _onednn_product(x, w)
            out[i] = product
    return out


def matmul_into(out: Tensor, a: Tensor, b: Tensor, *, accumulate: bool = False) -> Tensor:
    """``out = a @ b``, or ``out += a @ b`` with ``accumulate``; returns ``out``.

    ``out`` may be a view (a block of rows of a larger tensor); it is written in place. The oneDNN
    product is not in place: it runs on at most `MATMUL_INTO_ELEMENTS` entries of ``out``
    (whole rows) at a time, so its temporary stays that small whatever ``out``'s size (a strip's
    column product covers every later row of a 100,000-neuron layer).
    """
    work = a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if not _takes_onednn(a, b) and _reduced_precision(a, b) is None:
        with chosen_threads(work, product_kind(f"{a.dtype} bmm", a.shape[2])):
            return out.baddbmm_(a, b, beta=1.0 if accumulate else 0.0)
    step = max(1, MATMUL_INTO_ELEMENTS // max(out.shape[2], 1))
    pieces = product_group(work, _kind_of(a, b)) if step < out.shape[1] else contextlib.nullcontext()
    with pieces:
        for start in range(0, out.shape[1], step):
            stop = min(start + step, out.shape[1])
            product = batched_matmul(a[:, start:stop], b)
            if accumulate:
                out[:, start:stop].add_(product)
            else:
                out[:, start:stop].copy_(product)
    return out


def gram_in_strips(rows: Tensor) -> bool:
    """Whether `gram` computes the Gram matrix of ``[batch, n, d]`` rows in upper strips: on the
    CPU, for at least two strips of rows long enough to be bound by the product."""
    _, n, d = rows.shape
    large = n >= 2 * GRAM_STRIP_ROWS and d >= GRAM_STRIP_MIN_COLUMNS and n * d >= GRAM_STRIP_MIN_ELEMENTS
    return rows.device.type == "cpu" and large


def gram(rows: Tensor, *, mirror: bool = True) -> Tensor:
    r"""The Gram matrix \(X X^\top\) of ``[batch, n, d]`` rows, exactly symmetric.

    On the CPU, for rows long enough to be bound by the product (`gram_in_strips`), the upper
    strips \(X_I X_{J \ge I}^\top\) are computed and mirrored: \(n^2 d/2\) multiply-adds plus
    a strip's worth instead of \(n^2 d\). Elsewhere (GPU: fewer, larger launches pay more) one
    product. With ``mirror=False``, for a caller that reads the upper triangle \(j \ge i\) only,
    the strips are not mirrored and the entries below the diagonal are undefined. The strips choose
    their threads once, as one `product_group`.
    """
    batch, n, d = rows.shape
    if not gram_in_strips(rows):
        return batched_matmul(rows, rows.transpose(1, 2))
    out = rows.new_empty(batch, n, n)
    in_tiles = mirror and _mirrors_in_tiles(out)
    starts = range(0, n, GRAM_STRIP_ROWS)
    work = batch * d * sum(min(GRAM_STRIP_ROWS, n - start) * (n - start) for start in starts)
    with product_group(work, _kind_of(rows, rows.transpose(1, 2))):
        for start in starts:
            stop = min(start + GRAM_STRIP_ROWS, n)
            # into its place: torch.bmm's path writes there directly (0.82-0.92x the time of a strip
            # product and its copy at 1024 and 2048 x 512, CPU C), oneDNN's copies as before
            strip = matmul_into(out[:, start:stop, start:], rows[:, start:stop], rows[:, start:].transpose(1, 2))
            if mirror:
                _mirror_strip(out, strip, start, stop, in_tiles)
    return out


def _mirrors_in_tiles(out: Tensor) -> bool:
    """Whether `gram` mirrors ``out`` in the compiled library's cache-sized tiles (`_cpu_pairs.mirror_block`):
    where it is built and takes the dtype, not under ``torch.compile`` tracing. Decided once a matrix."""
    from lightning_hsu.functional import _cpu_pairs  # imports this module

    if torch.compiler.is_compiling() or out.dtype not in _cpu_pairs.MIRROR_DTYPES:
        return False
    return _cpu_pairs.takes(out)


def _mirror_strip(out: Tensor, strip: Tensor, start: int, stop: int, in_tiles: bool) -> None:
    r"""Entries ``[start:, start:stop]`` below the diagonal of the Gram matrices ``out`` from ``strip`` (their rows
    ``start:stop``, columns ``start`` on): in the compiled library's tiles with ``in_tiles``, else by ATen.
    The strip's diagonal tile too: a product's tile \(X_I X_I^\top\) need not be symmetric (MKL's dgemm)."""
    n = out.shape[1]
    if in_tiles:
        from lightning_hsu.functional import _cpu_pairs  # imports this module

        _cpu_pairs.mirror_block(out, (start, stop), (start, n))
        return
    if stop < n:
        out[:, stop:, start:stop] = strip[:, :, stop - start :].transpose(1, 2)
    tile = out[:, start:stop, start:stop]
    lower = torch.ones(stop - start, stop - start, dtype=torch.bool, device=out.device).tril_(-1)
    tile.copy_(torch.where(lower, tile.transpose(1, 2), tile))
