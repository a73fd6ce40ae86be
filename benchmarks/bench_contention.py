"""The penalty on a busy CPU: one intra-op thread against all, with a competing process on one core.

A `_contention.BusyCore` process spins on core 0 during the *busy* half of each round and
sleeps during the *idle* half; the benchmarked process is not pinned. Every round times each
method at 1 thread and at the default thread count, idle and busy, in a rotating order, so that
all conditions share the minute of a shared machine; per-round ratios give the paired medians
and 95% bootstrap intervals (`_common.paired_ratio`).

Methods, per case:

- **ours**: the library call, forward + backward, as shipped (elementwise passes on one thread,
  `lightning_hsu.functional._matmul.passes_on_one_thread`; each product on all threads or one,
  whichever `lightning_hsu.functional._product_threads` measured faster);
- **ours, kernel on one thread**: the same with every call of the compiled C kernel on the
  calling thread (``_cpu_pairs.PARALLEL_MIN_ENTRIES`` out of reach, the code before item 45);
- **ours, per-class choice**: the same with each size class choosing on its own measurements
  (``_product_threads.MACHINE_WIDE = False``, the code before item 41);
- **ours, all-thread products**: the same with every product on all threads
  (``LIGHTNING_HSU_PRODUCT_THREADS=all``, the code before the online choice);
- **ours, parallel passes**: the same with every pass on all threads too (``SERIAL_PASSES = False``,
  the code before the passes went to one thread);
- **ours, long passes on one thread**: the same with MGD's long float64 passes on one thread
  whatever the products chose (``PASSES_FOLLOW_PRODUCTS = False``, the code before item 55);
- **ours, chooser before item 57**: the same with a load marked whenever a clear winner's time up to
  the next product loses, whether or not its latest all-thread product alone still won clearly
  (``LOAD_FROM_PRODUCTS = False``), and thin products measured with deep ones of their size
  (``THIN_PRODUCT_DEPTH = 0``): the code before item 57;
- **ours, probes before item 58**: the same with every class on one thread taking the period's all-thread
  probe, however long its product (``PROBE_ALL_SHARE = None``): the code before item 58;
- **ours, loads from short products**: the same with a clear winner of any length marking a load when it moves
  to one thread (``LOAD_EVIDENCE_SECONDS = None``): the code before item 63;
- **ours, one-thread probes every 2 s**: the same with each class that keeps all threads re-measuring one thread
  every ``PROBE_ONE_SECONDS`` however much that costs (``PROBE_ONE_SHARE = None``): the code before item 62;
- **ours, chooser before item 61** (and 62, 63): the same with each all-thread probe under a load one product, measured
  however long the second core was quiet before it (``PROBE_WARM_UP_SECONDS = None``), and a load marked on
  the latest all-thread product alone of a clear winner moving to one thread, not their median
  (``LOAD_FROM_MEDIAN = False``): the code before item 61;
- **ours, probes every 0.5 s under a load**: the same with the all-thread probes under a load every
  ``PROBE_ALL_SECONDS`` however old the load (``PROBE_ALL_GROWTH_SECONDS = None``): the code before item 65;
- **ours, one slow product re-measures**: the same with one all-thread product ``SLOWDOWN`` times slower than its
  class's median enough to re-measure one thread, not two in a row (``SLOWDOWN_PRODUCTS = 1``): the code before
  item 66;
- **ours, without the runnable-task hint**: the same with the products' choice made from their times alone, without
  reading the machine's runnable tasks (``RUNNABLE_HINT = False``): the code before item 67;
- **ours, busy twin without a load**: the same with the hint's busy twin marking a load by the chooser's rules
  rather than holding one from its start (``TWIN_LOADED = False``): item 67's first version;
- **ours, kernel wide unless loaded**: the same with the compiled kernel's calls after a one-thread product on all
  threads wherever no load is marked, whether that product was a probe or its class's own choice
  (``_matmul.KERNEL_FOLLOWS_CLASS = False``): the code before item 68;
- **ours, each product chooses**: the same with every product choosing its threads and measured on its own, not once
  for `_matmul.gram`'s strips or a batch of oneDNN products (``_matmul.PRODUCT_GROUPS = False``): the code before
  item 69;
- **official**: the concatenating port of the official code (``bench_kernels.official_mhe``);
- **products**: the products the package itself must do, half the Gram matrix (its upper strips
  of 128 rows, as `lightning_hsu.functional._matmul.gram` and the strip schedule compute
  it, without the mirroring) and the gradient product ``C W``, with the library's products on
  all threads.

Each mode has its own product chooser, kept for the whole run, on a clock that runs only during that mode's calls
(`_common.OwnClock`), so that its probe periods and a load's age are in its own time. (The runs recorded up to
``results_cpu_d_item65.md`` read the wall clock: a mode's periods ran during the other methods' calls, and each of
its samples began with the probes that had fallen due meanwhile.)

Each timed call of ours follows ``--settle`` untimed ones in its condition (a load that lasts;
16 calls of MHE at 512 x 4608 take about 0.4-0.7 s, longer than the choice takes to follow);
``--calls-per-sample N`` times N calls together instead of one (their mean), so that costs that
come every few calls, the products' all-thread probes or glibc's heap giving memory back, are
counted rather than left out by the median of single calls; ``--transitions N`` times N calls
one by one after the competing process starts and after it stops, to show how many calls the
products' thread choice takes to follow.

Cases: half- and full-space MHE at 512 x 4608 (a 3x3 conv with 512 channels), optionally at
4096 x 512 (``--kernels half,full,large``); the exact full-space MHE of a large classifier (``--huge-n``, default
10,000 x 512, scaled down from the 100,000 of ``bench_huge.py`` to fit the time); one training
step of the CIFAR ResNet-18 of ``bench_training_step.py`` with its MHE penalty (``--step``); the
other regularisers in half space (``--others mhs,uniformity,mgd,mhp,comhe``), at 512 x 4608 or
``--others-shape``. ``--arms`` picks the ablation arms of ours (default: all).

Usage: ``python benchmarks/bench_contention.py [--rounds 6] [--settle 16] [--kernels half,full,large]
[--others mhs,uniformity] [--others-shape 1024,512] [--arms "shipped,kernel on one thread"]
[--huge-n 10000] [--step] [--transitions 16] [--steady-heap] [--calls-per-sample 8]``.

``--steady-heap`` keeps glibc's heap from returning its free top to the kernel between calls
(`_common.steady_heap`): the page faults of regrowing it depend on the order of the allocations,
which differs between the one-thread and the many-thread path (item 38 of ``docs/performance.md``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import OwnClock, half_gram_products, machine, ms, names_of, paired_ratio, steady_heap, table
from _contention import BusyCore

from lightning_hsu.functional import _cpu_pairs, _matmul, _product_threads, hyperspherical_energy
from lightning_hsu.functional._matmul import batched_matmul, passes_on_one_thread
from lightning_hsu.functional._product_threads import PRODUCT_THREADS_ENV

Method = tuple[Callable[[], object], str]  # (call, one of MODES)


@dataclass(frozen=True)
class Mode:
    """The library's switches for one arm; the defaults are the shipped settings."""

    serial_passes: bool = True  # `_matmul.SERIAL_PASSES`
    product_threads: str = "adaptive"  # `_product_threads.PRODUCT_THREADS_ENV`
    machine_wide: bool = True  # `_product_threads.MACHINE_WIDE`
    kernel_shares_threads: bool = True  # the compiled kernel's calls on Torch's threads (`_cpu_pairs`)
    passes_follow_products: bool = True  # `_matmul.PASSES_FOLLOW_PRODUCTS`
    # item 57: `_product_threads.LOAD_FROM_PRODUCTS`, and thin products measured apart (`_matmul.THIN_PRODUCT_DEPTH`)
    load_from_products: bool = True
    probe_all_share: float | None = _product_threads.PROBE_ALL_SHARE  # item 58
    # item 61: `_product_threads.PROBE_WARM_UP_SECONDS` and `_product_threads.LOAD_FROM_MEDIAN`
    probe_warm_up: float | None = _product_threads.PROBE_WARM_UP_SECONDS
    load_from_median: bool = True
    probe_one_share: float | None = _product_threads.PROBE_ONE_SHARE  # item 62
    load_evidence: float | None = _product_threads.LOAD_EVIDENCE_SECONDS  # item 63
    probe_all_growth: float | None = _product_threads.PROBE_ALL_GROWTH_SECONDS  # item 65
    slowdown_products: int = _product_threads.SLOWDOWN_PRODUCTS  # item 66
    runnable_hint: bool = True  # item 67: `_product_threads.RUNNABLE_HINT`
    twin_loaded: bool = True  # item 67: `_product_threads.TWIN_LOADED`
    kernel_follows_class: bool = True  # item 68: `_matmul.KERNEL_FOLLOWS_CLASS`
    product_groups: bool = True  # item 69: `_matmul.PRODUCT_GROUPS`


MODES = {
    "shipped": Mode(),
    "kernel on one thread": Mode(kernel_shares_threads=False),
    "per-class choice": Mode(machine_wide=False),
    "all-thread products": Mode(product_threads="all"),
    "parallel passes": Mode(serial_passes=False, product_threads="all"),
    "long passes on one thread": Mode(passes_follow_products=False),
    "chooser before item 57": Mode(load_from_products=False),
    "probes before item 58": Mode(probe_all_share=None),
    "loads from short products": Mode(load_evidence=None),
    "one-thread probes every 2 s": Mode(probe_one_share=None),
    "chooser before item 61": Mode(
        probe_warm_up=None, load_from_median=False, probe_one_share=None, load_evidence=None
    ),
    "probes every 0.5 s under a load": Mode(probe_all_growth=None),
    "one slow product re-measures": Mode(slowdown_products=1),
    "without the runnable-task hint": Mode(runnable_hint=False),
    "busy twin without a load": Mode(twin_loaded=False),
    "kernel wide unless loaded": Mode(kernel_follows_class=False),
    "each product chooses": Mode(product_groups=False),
}
_TEAM_MIN_ENTRIES = _cpu_pairs.PARALLEL_MIN_ENTRIES
_THIN_DEPTH = _matmul.THIN_PRODUCT_DEPTH
#: each mode's own product chooser, so that one mode's measurements do not steer another's, on a clock of its own time
_CHOOSERS: dict[str, _product_threads.ProductThreadChooser] = {}


def set_mode(mode: str, chooser: _product_threads.ProductThreadChooser | None = None) -> None:
    """Set the library's switches of ``mode`` (one of `MODES`) and install ``chooser``, by default the mode's own
    (kept from call to call, so that one mode's measurements do not steer another's). The installed chooser's
    `OwnClock` runs from here; the one it replaces stops."""
    switches = MODES[mode]
    _matmul.SERIAL_PASSES = switches.serial_passes
    _product_threads.MACHINE_WIDE = switches.machine_wide
    _matmul.PASSES_FOLLOW_PRODUCTS = switches.passes_follow_products
    _product_threads.LOAD_FROM_PRODUCTS = switches.load_from_products
    _product_threads.PROBE_ALL_SHARE = switches.probe_all_share
    _product_threads.PROBE_WARM_UP_SECONDS = switches.probe_warm_up
    _product_threads.LOAD_FROM_MEDIAN = switches.load_from_median
    _product_threads.PROBE_ONE_SHARE = switches.probe_one_share
    _product_threads.LOAD_EVIDENCE_SECONDS = switches.load_evidence
    _product_threads.PROBE_ALL_GROWTH_SECONDS = switches.probe_all_growth
    _product_threads.SLOWDOWN_PRODUCTS = switches.slowdown_products
    _product_threads.RUNNABLE_HINT = switches.runnable_hint
    _product_threads.TWIN_LOADED = switches.twin_loaded
    _matmul.KERNEL_FOLLOWS_CLASS = switches.kernel_follows_class
    _matmul.PRODUCT_GROUPS = switches.product_groups
    _matmul.THIN_PRODUCT_DEPTH = _THIN_DEPTH if switches.load_from_products else 0
    _cpu_pairs.PARALLEL_MIN_ENTRIES = _TEAM_MIN_ENTRIES if switches.kernel_shares_threads else 2**62
    os.environ[PRODUCT_THREADS_ENV] = switches.product_threads
    chooser = chooser or _CHOOSERS.get(mode)
    if chooser is None:
        chooser = _CHOOSERS[mode] = _product_threads.ProductThreadChooser(OwnClock())
    previous = _product_threads.CHOOSER
    if chooser is not previous and isinstance(previous.clock, OwnClock):
        previous.clock.pause()
    if isinstance(chooser.clock, OwnClock):
        chooser.clock.resume()
    _product_threads.CHOOSER = chooser


def _mhe(w: torch.Tensor, half_space: bool) -> Callable[[], object]:
    def run() -> None:
        w.grad = None
        hyperspherical_energy(w, half_space=half_space).backward()

    return run


def _official(w: torch.Tensor, half_space: bool) -> Callable[[], object]:
    from bench_kernels import official_mhe

    def run() -> None:
        w.grad = None
        official_mhe(w, half_space).backward()

    return run


def _products(w: torch.Tensor) -> Callable[[], object]:
    """The package's own floor: the upper strips of the Gram matrix and the gradient product."""
    x = w.detach().unsqueeze(0)
    coeff = torch.randn(1, x.shape[1], x.shape[1])

    def run() -> None:
        with passes_on_one_thread(x.device):  # as inside the pair sums: products on all threads
            half_gram_products(x)
            batched_matmul(coeff, x)

    return run


def measure(
    methods: dict[str, Method], busy: BusyCore, rounds: int, threads: int, settle: int = 0, calls: int = 1
) -> dict[tuple[str, int, str], list[float]]:
    """Seconds per call, keyed by (``idle``/``busy``, threads, method), one sample each per round:
    the mean over ``calls`` consecutive calls (more than one: costs that come every few calls, such
    as the products' all-thread probes or glibc's heap giving memory back, are counted).

    Each timed call of the library ("ours...") follows ``settle`` untimed calls of it in the same
    condition, so that the products' thread choice (`_product_threads`) has measured the
    condition, as under a load that lasts; how fast it follows a change of load: `transitions`."""
    counts = sorted({1, threads})
    times: dict[tuple[str, int, str], list[float]] = {}
    names = list(methods)
    for count in counts:  # warm-up: oneDNN primitives, allocator
        torch.set_num_threads(count)
        for name in names:
            call, mode = methods[name]
            set_mode(mode)
            call()
    for rnd in range(rounds):
        states = ("idle", "busy") if rnd % 2 == 0 else ("busy", "idle")
        for state in states:
            busy.on() if state == "busy" else busy.off()
            order = counts if rnd % 2 == 0 else counts[::-1]
            for count in order:
                torch.set_num_threads(count)
                for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                    call, mode = methods[name]
                    set_mode(mode)
                    for _ in range(settle if name.startswith("ours") else 0):
                        call()
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        call()
                    times.setdefault((state, count, name), []).append((time.perf_counter() - t0) / calls)
    busy.off()
    set_mode("shipped")
    torch.set_num_threads(threads)
    return times


def _interval(num: list[float], den: list[float]) -> str:
    median, low, high = paired_ratio(num, den)
    return f"{median:.2f} [{low:.2f}, {high:.2f}]"


def report(title: str, times: dict[tuple[str, int, str], list[float]], threads: int, load: str) -> None:
    names = list(dict.fromkeys(k[2] for k in times))
    print(f"### {title}\n\n{load}\n")
    header = ["method"]
    header += [f"{s} {t}t ms" for s in ("idle", "busy") for t in (1, threads)]
    header += [f"idle {threads}t / 1t", f"busy {threads}t / 1t", f"busy {threads}t / idle 1t"]
    rows = []
    for name in names:
        row: list[object] = [name]
        row += [ms(statistics.median(times[(s, t, name)])) for s in ("idle", "busy") for t in (1, threads)]
        row += [_interval(times[(s, threads, name)], times[(s, 1, name)]) for s in ("idle", "busy")]
        row.append(_interval(times[("busy", threads, name)], times[("idle", 1, name)]))
        rows.append(row)
    print(table(header, rows))
    ratios = []
    # every ablation arm against ours, as ARMS names them
    for other in ("official", "products", *(f"ours{suffix}" for suffix, mode in ARMS if mode != "shipped")):
        if other not in names:
            continue
        for s in ("idle", "busy"):
            for t in (1, threads):
                num, den = (times[(s, t, other)], times[(s, t, "ours")])
                if other == "products":
                    num, den = den, num
                label = "ours / products" if other == "products" else f"{other} / ours"
                ratios.append([label, f"{s} {t}t", _interval(num, den)])
    if ratios:
        print()
        print(table(["ratio (paired, per round)", "condition", "median [95% interval]"], ratios))
    print()


def transitions(call: Callable[[], object], busy: BusyCore, calls: int, repeats: int, threads: int) -> None:
    """Per-call times after the competing process starts, then after it stops, per mode (medians over repeats)."""
    sequences = {"busy from call 1": True, "idle from call 1": False}  # title: busy after the switch
    arms = [("ours", "shipped", threads), ("ours, all-thread products", "all-thread products", threads)]
    arms.append(("ours at 1 thread", "shipped", 1))
    rows = []
    for title, busy_after in sequences.items():
        for name, mode, count in arms:
            runs: list[list[float]] = []
            for _ in range(repeats):
                torch.set_num_threads(count)
                set_mode(mode)
                busy.off() if busy_after else busy.on()
                for _ in range(2 * calls):  # settled in the opposite condition
                    call()
                busy.on() if busy_after else busy.off()
                run = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    call()
                    run.append(time.perf_counter() - t0)
                runs.append(run)
            medians = [statistics.median(r[i] for r in runs) for i in range(calls)]
            rows.append([title, name, *(f"{1e3 * m:.0f}" for m in medians)])
    busy.off()
    set_mode("shipped")
    torch.set_num_threads(threads)
    print(table(["load", "method", *(str(i + 1) for i in range(calls))], rows))
    print()


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f}"


#: (suffix of the method's name, mode): the library as shipped and its ablation, one arm a mode
ARMS = tuple(("" if mode == "shipped" else f", {mode}", mode) for mode in MODES)


def _measure_and_report(
    title: str, methods: dict[str, Method], busy: BusyCore, rounds: int, threads: int, settle: int, calls: int = 1
) -> None:
    load = _load()
    times = measure(methods, busy, rounds, threads, settle, calls)
    report(f"{title}, forward + backward", times, threads, f"{load} before, {_load()} after")


#: --kernels name: (title, n, d, half space, with the official port)
KERNEL_CASES = {
    "half": ("half-space MHE", 512, 4608, True, True),
    "full": ("full-space MHE", 512, 4608, False, True),
    "large": ("half-space MHE", 4096, 512, True, False),  # official: an 8192^2 autograd graph, skipped
}


def _regularizer(name: str, w: torch.Tensor) -> Callable[[], object]:
    """One training step's penalty of a regulariser other than MHE (half space), forward + backward."""
    from lightning_hsu.regularizers.registry import make_regularizer

    options = {"half_space": True} if name != "rmhp" else {}
    regularizer = make_regularizer(name, **options)
    step = iter(range(10**9))

    def run() -> None:
        w.grad = None
        regularizer(w, step=next(step)).backward()

    return run


#: --others: regularisers whose own passes lie outside the pair sums (item 28)
OTHER_REGULARIZERS = ("mhs", "uniformity", "mgd", "mhp", "comhe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="the many-thread setting")
    parser.add_argument("--core", type=int, default=0, help="the core the competing process is pinned to")
    parser.add_argument(
        "--kernels", default="half,full", help="comma-separated subset of half, full, large (4096 x 512); '' for none"
    )
    parser.add_argument(
        "--others", default="", help=f"comma-separated subset of {','.join(OTHER_REGULARIZERS)} (at --others-shape)"
    )
    parser.add_argument("--others-shape", default="512,4608", help="n,d of the --others layer")
    parser.add_argument(
        "--arms",
        default=",".join(mode for _, mode in ARMS),
        help="comma-separated ablation arms of ours: " + ", ".join(mode for _, mode in ARMS),
    )
    parser.add_argument("--huge-n", type=int, default=0, help="exact full-space MHE of n x 512 (0: skip)")
    parser.add_argument("--huge-rounds", type=int, default=2)
    parser.add_argument("--step", action="store_true", help="the ResNet-18 training step")
    parser.add_argument("--step-rounds", type=int, default=5)
    parser.add_argument(
        "--settle", type=int, default=16, help="untimed calls before each timed one of ours (kernels, --others)"
    )
    parser.add_argument(
        "--calls-per-sample",
        type=int,
        default=1,
        help="calls timed together per sample of the kernels and --others (their mean; 1: one call)",
    )
    parser.add_argument(
        "--transitions", type=int, default=0, help="calls timed one by one after the load starts and stops (0: skip)"
    )
    parser.add_argument(
        "--steady-heap", action="store_true", help="keep glibc's heap from shrinking between calls (mallopt)"
    )
    args = parser.parse_args()
    if args.calls_per_sample < 1:
        parser.error(f"--calls-per-sample must be at least 1, got {args.calls_per_sample}")
    start = time.perf_counter()
    heap = steady_heap() if args.steady_heap else "glibc heap as configured (default: it shrinks and regrows)"
    print(f"Machine: {machine()}; competing process pinned to core {args.core}; {heap}\n")
    arms = set(names_of(parser, "--arms", args.arms, MODES))
    if "shipped" not in arms:
        parser.error(f"--arms: include shipped; got {sorted(arms)}")
    selected = tuple(arm for arm in ARMS if arm[1] in arms)
    others_n, others_d = (int(v) for v in args.others_shape.split(","))
    kernels = names_of(parser, "--kernels", args.kernels, KERNEL_CASES)
    others = names_of(parser, "--others", args.others, OTHER_REGULARIZERS)
    with BusyCore(args.core) as busy:
        for title, n, d, half, official in (KERNEL_CASES[k] for k in kernels):
            torch.manual_seed(0)
            w = torch.randn(n, d, requires_grad=True)
            methods: dict[str, Method] = {f"ours{label}": (_mhe(w, half), mode) for label, mode in selected}
            if official:
                methods["official"] = (_official(w, half), "all-thread products")  # no chooser runs
            methods["products"] = (_products(w), "all-thread products")
            _measure_and_report(
                f"{title}, {n} x {d}", methods, busy, args.rounds, args.threads, args.settle, args.calls_per_sample
            )
        for name in others:
            torch.manual_seed(0)
            w = torch.randn(others_n, others_d, requires_grad=True)
            methods = {f"ours{label}": (_regularizer(name, w), mode) for label, mode in selected}
            title = f"{name}, half space, {others_n} x {others_d}"
            _measure_and_report(title, methods, busy, args.rounds, args.threads, args.settle, args.calls_per_sample)
        if args.huge_n:
            from bench_huge import _weight

            w = _weight(args.huge_n, 512, "cpu")
            methods = {f"ours{label}": (_mhe(w, False), mode) for label, mode in selected}
            title = f"exact full-space MHE, {args.huge_n} x 512"
            _measure_and_report(title, methods, busy, args.huge_rounds, args.threads, 1)
        if args.step:
            from bench_training_step import ResNet18, make_step, penalty_per_layer

            torch.manual_seed(0)
            model = ResNet18()
            x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
            methods = {
                "no penalty": (make_step(model, None, x, y), "all-thread products"),  # no chooser runs
                **{f"ours{label}": (make_step(model, penalty_per_layer, x, y), mode) for label, mode in selected},
            }
            load = _load()
            times = measure(methods, busy, args.step_rounds, args.threads, settle=2)
            load = f"{load} before, {_load()} after"
            report("ResNet-18 training step, batch 64, MHE penalty", times, args.threads, load)
            growth = []
            for s in ("idle", "busy"):
                for t in sorted({1, args.threads}):
                    base = times[(s, t, "no penalty")]
                    for name in [f"ours{label}" for label, _ in selected]:
                        median, low, high = paired_ratio(times[(s, t, name)], base)
                        cell = f"{100 * (median - 1):+.1f}% [{100 * (low - 1):+.1f}, {100 * (high - 1):+.1f}]"
                        growth.append([name, f"{s} {t}t", cell])
            print(table(["step with penalty vs without", "condition", "paired growth [95% interval]"], growth))
            print()
        if args.transitions:
            torch.manual_seed(0)
            w = torch.randn(512, 4608, requires_grad=True)
            print(f"### Following a change of load: half-space MHE, 512 x 4608, ms per call\n\n{_load()}\n")
            transitions(_mhe(w, True), busy, args.transitions, args.rounds, args.threads)
    print(f"Total benchmark time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
