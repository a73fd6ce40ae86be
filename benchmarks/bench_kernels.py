"""Per-layer forward + backward of the regularisers: ours vs the official formulation vs the
matrix-multiply lower bound.

- **ours**: the library function, value and gradient (``.backward()`` through the normaliser).
- **official**: a direct PyTorch port of the official TF code (Liu et al. 2018/2021, Lin et al.
  2020): half-space by concatenating ``[W; -W]``, the full ``2n x 2n`` matrix, autograd.
- **lower bound**: the matrix products the package itself must do. MHE: the upper half of the
  Gram matrix (its strips of 128 rows, n²d/2 multiply-adds plus a strip's) and the gradient
  product ``G W``; before 2026-12 the full ``W Wᵀ`` was used, which the package never computes.
  MHS: the Gram product as the package computes it (its strips where ``_matmul.gram`` uses them),
  its gradient being sparse; MGD: the same and the gradient product in float64, as the package
  computes them, plus its Cholesky factorisations and their inverses, which any exact gradient
  of a log-determinant needs (before item 42 of ``docs/performance.md``: the full float32 Gram and
  gradient products); CoMHE: the projections forward and backward plus ``K`` Gram and gradient
  products, on the CPU a group of at most ``pairwise.DENSE_GROUP_ELEMENTS`` Gram entries at a time,
  as the package computes them (before item 46: all ``K`` at once, whose fresh ``[K, n, n]``
  output faulted its pages in every call).
  On the CPU each product is timed both with ``torch.mm`` (MKL) and with oneDNN's float32 product
  (what the library uses there except on Intel CPUs, ``lightning_hsu.functional._matmul``), and the
  faster is the bound.
- on CUDA, for MHE and CoMHE, also **ours without the host sync** (``check_finite=False``, what
  the callback calls on a GPU) and the same **replayed from a CUDA graph** (what the callback runs).

``--steady-heap`` keeps glibc's heap from shrinking between calls (`_common.steady_heap`): the
official port's large temporaries otherwise make the heap shrink and regrow, and the next method
pays the page faults (``docs/performance.md``, item 38).

Usage: ``python benchmarks/bench_kernels.py [--quick] [--device cuda] [--json out.json] [--plot docs/x.png]
[--steady-heap] [--warmup 6]`` (``--warmup 6`` at two threads: the table of ``docs/performance.md``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import torch
from _common import (
    add_common_args,
    apply_threads,
    cpu_model,
    device_arg,
    half_gram_products,
    machine,
    mib,
    ms,
    paired_ratio,
    steady_heap,
    table,
    time_methods,
)

from lightning_hsu.cuda_graphs import GraphedPenalties
from lightning_hsu.functional import (
    _matmul,
    compressive_energy,
    gram_determinant_penalty,
    hyperspherical_energy,
    hyperspherical_separation,
)
from lightning_hsu.functional._matmul import batched_matmul, gram_in_strips, onednn_operator
from lightning_hsu.functional.pairwise import DENSE_GROUP_ELEMENTS

EPS = 1e-4


# ---- official formulations (concatenation, full matrix, autograd) ----------------------------
def _official_unit(w: torch.Tensor, half_space: bool) -> torch.Tensor:
    x = torch.cat([w, -w]) if half_space else w
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + EPS)


def official_mhe(w: torch.Tensor, half_space: bool, power: float = 2.0) -> torch.Tensor:
    """``wy1iu/MHE`` ``_add_thomson_constraint``: full matrix, upper triangle, mean."""
    x = _official_unit(w, half_space)
    n = x.shape[0]
    sq = 2.0 - 2.0 * (x @ x.T) + torch.eye(n, device=x.device, dtype=x.dtype)
    final = sq.pow(-power / 2.0).triu(1)
    return final.sum() / (n * (n - 1) / 2)


def official_mhs(w: torch.Tensor, half_space: bool) -> torch.Tensor:
    """Hard MHS: minimum of the upper-triangular ``d^2``, ties summed."""
    x = _official_unit(w, half_space)
    n = x.shape[0]
    sq = 2.0 - 2.0 * (x @ x.T)
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
    masked = torch.where(upper, sq, torch.full_like(sq, math.inf))
    smallest = masked.min()
    return -(masked * (masked == smallest)).nan_to_num(0.0, posinf=0.0).sum()


def official_mgd(w: torch.Tensor, half_space: bool) -> torch.Tensor:
    """MGD: ``-logdet(exp(-d^2) + 1e-6 I)`` of the ``2n x 2n`` kernel (float64, as ours)."""
    x = _official_unit(w, half_space).double()
    n = x.shape[0]
    k = torch.exp(-(2.0 - 2.0 * (x @ x.T))) + 1e-6 * torch.eye(n, device=x.device, dtype=x.dtype)
    return -torch.logdet(k).float()


def official_comhe(w: torch.Tensor, projections: torch.Tensor, half_space: bool) -> torch.Tensor:
    """``rmlin/CoMHE``: project, then the official MHE of each projection, averaged (a loop)."""
    return torch.stack([official_mhe(w @ p.T, half_space) for p in projections]).mean()


# ---- the benchmark --------------------------------------------------------------------------
def backward_of(fn, w: torch.Tensor):
    def run() -> None:
        w.grad = None
        fn(w).backward()

    return run


def graphed_backward_of(fn, w: torch.Tensor):
    """``backward_of`` replayed from a CUDA graph (:class:`~lightning_hsu.cuda_graphs.GraphedPenalties`)."""
    graphs = GraphedPenalties([fn], [w])

    def run() -> None:
        w.grad = None
        graphs().sum().backward()

    return run


KINDS = ("mhe", "mhs", "mgd", "comhe")


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return batched_matmul(a.unsqueeze(0), b.unsqueeze(0))[0]


def through_onednn(run):
    """``run`` with the package's float32 CPU products on oneDNN, whatever this CPU's default
    (``_matmul``: ``torch.bmm`` on Intel CPUs), so that the bound is the faster of both libraries."""

    def forced() -> None:
        chosen = _matmul._onednn_linear
        _matmul._onednn_linear = onednn_operator
        try:
            run()
        finally:
            _matmul._onednn_linear = chosen

    return forced


def _package_gram(x: torch.Tensor, mm) -> None:
    """The Gram product of ``[n, d]`` rows as `lightning_hsu.functional._matmul.gram` computes it: its
    upper strips of 128 rows where it uses them (`gram_in_strips`), else one product."""
    if gram_in_strips(x.unsqueeze(0)):
        half_gram_products(x.unsqueeze(0), None if mm is onednn_mm else mm)
    else:
        mm(x, x.T)


def lower_bound(kind: str, w: torch.Tensor, half_space: bool, projections: torch.Tensor | None, mm=torch.mm):
    n, _ = w.shape
    x = w.detach()
    g = torch.randn(n, n, device=w.device, dtype=w.dtype)
    if kind == "mhs":
        return lambda: _package_gram(x, mm)
    if kind == "mgd":  # float64 throughout, whose products the library leaves to torch.bmm (MKL)
        spd = (g @ g.T / n + torch.eye(n, device=w.device, dtype=w.dtype)).double()
        x64, g64 = x.double(), g.double()

        def run() -> None:
            _package_gram(x64, torch.mm)
            torch.mm(g64, x64)
            for _ in range(2 if half_space else 1):
                torch.cholesky_inverse(torch.linalg.cholesky(spd))

        return run
    if kind == "comhe":
        assert projections is not None
        count, dim, _ = projections.shape
        stacked = projections.reshape(count * dim, -1)  # all projections as one [K p, d] matrix
        gp = torch.randn(count, n, n, device=w.device, dtype=w.dtype)
        bmm = torch.bmm if mm is torch.mm else batched_matmul
        # on the CPU the package takes the projections' Gram matrices a group at a time (item 46)
        group = max(1, DENSE_GROUP_ELEMENTS // (n * n)) if w.device.type == "cpu" else count

        def run() -> None:
            p = mm(x, stacked.T).view(n, count, dim).transpose(0, 1)  # projections forward
            gp_p = torch.empty(count, n, dim, device=w.device, dtype=w.dtype)
            for i in range(0, count, group):
                bmm(p[i : i + group], p[i : i + group].transpose(1, 2))
                gp_p[i : i + group] = bmm(gp[i : i + group], p[i : i + group])
            mm(gp_p.transpose(0, 1).reshape(n, count * dim), stacked)  # and backward

        return run
    # MHE: the products the package itself must do, the upper half of the Gram matrix in strips
    # and the gradient product (the full W Wᵀ of earlier tables is not its floor)
    strips_mm = None if mm is onednn_mm else mm
    x_batch = x.unsqueeze(0)
    return lambda: (half_gram_products(x_batch, strips_mm), mm(g, x))


def methods_for(kind: str, w: torch.Tensor, half_space: bool, projections: torch.Tensor | None):
    if kind == "mhe":
        methods = {
            "ours": backward_of(lambda v: hyperspherical_energy(v, half_space=half_space), w),
            "official": backward_of(lambda v: official_mhe(v, half_space), w),
        }
        if w.is_cuda:  # what the callback runs on a GPU: no host sync, then the same replayed
            unchecked = functools.partial(hyperspherical_energy, half_space=half_space, check_finite=False)
            methods["no sync"] = backward_of(unchecked, w)
            methods["graph"] = graphed_backward_of(unchecked, w)
        return methods
    if kind == "mhs":
        return {
            "ours": backward_of(lambda v: hyperspherical_separation(v, half_space=half_space), w),
            "official": backward_of(lambda v: official_mhs(v, half_space), w),
        }
    if kind == "mgd":
        return {
            "ours": backward_of(lambda v: gram_determinant_penalty(v, half_space=half_space), w),
            "official": backward_of(lambda v: official_mgd(v, half_space), w),
        }
    assert projections is not None
    methods = {
        "ours": backward_of(lambda v: compressive_energy(v, projections, half_space=half_space), w),
        "official": backward_of(lambda v: official_comhe(v, projections, half_space), w),
    }
    if w.is_cuda:  # the graph reads fixed projections here; the callback redraws them in place each step
        unchecked = functools.partial(
            compressive_energy, projections=projections, half_space=half_space, check_finite=False
        )
        methods["no sync"] = backward_of(unchecked, w)
        methods["graph"] = graphed_backward_of(unchecked, w)
    return methods


def dim_for(n: int) -> int:
    """A ResNet conv layer's fan-in (9 x channels) up to 512 neurons, a 512-feature linear above."""
    return 9 * n if n <= 512 else 512


def bench_case(
    kind: str, n: int, d: int, half_space: bool, device: torch.device, repeats: int, warmup: int = 1
) -> dict:
    torch.manual_seed(0)
    w = torch.randn(n, d, device=device, requires_grad=True)
    projections = torch.randn(20, 40, d, device=device) if kind == "comhe" else None
    methods = methods_for(kind, w, half_space, projections)
    methods["lower bound"] = lower_bound(kind, w, half_space, projections)
    if device.type == "cpu" and onednn_operator() is not None:
        methods["lower bound, oneDNN"] = through_onednn(lower_bound(kind, w, half_space, projections, mm=onednn_mm))
    for name, method in methods.items():  # the package's calls settle its product chooser; the others need one
        if name != "official" and not name.startswith("lower bound"):
            for _ in range(warmup - 1):
                method()
    timings = time_methods(methods, device, repeats)
    fast = timings.pop("lower bound, oneDNN", None)
    if fast is not None and fast.wall < timings["lower bound"].wall:
        timings["lower bound"] = fast
    return {
        "kind": kind,
        "space": "half" if half_space else "full",
        "n": n,
        "d": d,
        **{f"{k}_wall": t.wall for k, t in timings.items()},
        **{f"{k}_cpu": t.cpu for k, t in timings.items()},
        **{f"{k}_peak": t.peak_bytes for k, t in timings.items()},
        **{f"{k}_walls": t.walls for k, t in timings.items()},
    }


def _paired(r: dict, num: str, den: str) -> str:
    """Median of the per-repeat ratios and its 95% bootstrap interval (one repeat: the ratio)."""
    a, b = r.get(f"{num}_walls"), r.get(f"{den}_walls")
    if not a or not b or len(a) < 3:
        return f"{r[f'{num}_wall'] / r[f'{den}_wall']:.3g}"
    median, low, high = paired_ratio(a, b)
    return f"{median:.3g} [{low:.3g}, {high:.3g}]"


def rows_of(results: list[dict], device: torch.device) -> tuple[list[str], list[list[object]]]:
    header = ["regulariser", "space", "n", "d", "ours ms", "official ms", "lower bound ms"]
    header += ["official / ours [95%]", "ours / bound [95%]"]
    if device.type == "cpu":
        header += ["CPU-time official / ours", "CPU-time ours / bound"]
    else:
        header += ["peak MiB ours", "peak MiB official"]
        header += ["ours, no host sync ms", "ours, CUDA graph ms", "graph / bound"]
    rows = []
    for r in results:
        row = [r["kind"].upper(), r["space"], r["n"], r["d"], ms(r["ours_wall"]), ms(r["official_wall"])]
        row += [ms(r["lower bound_wall"]), _paired(r, "official", "ours"), _paired(r, "ours", "lower bound")]
        if device.type == "cpu":
            row += [r["official_cpu"] / r["ours_cpu"], r["ours_cpu"] / r["lower bound_cpu"]]
        else:
            row += [mib(r["ours_peak"]), mib(r["official_peak"])]
            if "graph_wall" in r:
                row += [ms(r["no sync_wall"]), ms(r["graph_wall"]), r["graph_wall"] / r["lower bound_wall"]]
            else:
                row += ["–", "–", "–"]
        rows.append(row)
    return header, rows


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sel = sorted((r for r in results if r["kind"] == "mhe" and r["space"] == "half"), key=lambda r: r["n"])
    ns = [r["n"] for r in sel]
    series = [("official", "s--", "official"), ("ours", "o-", "ours"), ("lower bound", "^:", "bound: its own products")]
    if sel and all("graph_wall" in r for r in sel):  # CUDA: what the callback runs
        series.append(("graph", "d-", "ours, CUDA graph"))
    for key, style, label in series:
        ax.plot(ns, [ms(r[f"{key}_wall"]) for r in sel], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("neurons n (d = 9n up to 512, then 512)")
    ax.set_ylabel("forward + backward, ms (median)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--quick", action="store_true", help="n up to 1024, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed calls of the package's methods first (the others take one); at two threads the package's "
        "product chooser measures each new size of product on all threads and on one over its first five products "
        "(docs/performance.md, item 31), so 6 times the settled choice",
    )
    parser.add_argument(
        "--max-n", type=int, default=2048, help="4096 adds n = 4096 (about 10 more minutes on a 2-core CPU)"
    )
    parser.add_argument(
        "--kinds", default="mhe,mhs,mgd,comhe", help="comma-separated subset of the regularisers to time"
    )
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--plot", default=None, help="write a PNG of half-space MHE time vs n here")
    parser.add_argument(
        "--steady-heap", action="store_true", help="keep glibc's heap from shrinking between calls (mallopt)"
    )
    args = parser.parse_args()
    apply_threads(args.threads)
    device = device_arg(args.device)
    start = time.perf_counter()
    heap = f"; {steady_heap()}" if args.steady_heap else ""
    print(f"Machine: {machine()}{heap}\n")

    repeats = args.repeats or (3 if args.quick else 5)
    kinds = [k.strip() for k in args.kinds.split(",")]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; choose from {list(KINDS)}")
    results = []
    if "mhe" in kinds:
        head = bench_case("mhe", 512, 4608, True, device, max(repeats, 7), args.warmup)
        print("### Half-space MHE (s = 2), n = 512, d = 4608, forward + backward\n")
        header, rows = rows_of([head], device)
        print(table(header, rows))
        print(
            f"\nTargets (medians of the per-repeat ratios, as in the table): official / ours >= 4 (measured "
            f"{_paired(head, 'official', 'ours')}), ours / lower bound <= 1.5 (measured "
            f"{_paired(head, 'ours', 'lower bound')}).\n"
        )
        results.append(head)

    sizes = [64, 256, 1024] if args.quick else [64, 256, 512, 1024, 2048]
    if args.max_n >= 4096 and not args.quick:
        sizes.append(4096)
    cases = [("mhe", True), ("mhe", False), ("mhs", True), ("mgd", True), ("comhe", True)]
    for kind, half in (case for case in cases if case[0] in kinds):
        for n in sizes:
            if kind == "mhe" and half and n == 512:
                continue  # measured above
            reps = repeats if n < 4096 else max(3, repeats - 2)  # n = 4096: the official ports take minutes
            results.append(bench_case(kind, n, 4608 if n == 512 else dim_for(n), half, device, reps, args.warmup))
    results.sort(key=lambda r: (KINDS.index(r["kind"]), r["space"] != "half", r["n"]))
    print("### All regularisers, forward + backward (CoMHE: 20 projections to 40 dims)\n")
    header, rows = rows_of(results, device)
    print(table(header, rows))
    print(f"\nTotal benchmark time {time.perf_counter() - start:.0f} s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=1)
    if args.plot:
        where = torch.cuda.get_device_name() if device.type == "cuda" else cpu_model()
        plot(results, args.plot, f"Half-space MHE (s = 2), {where}, {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
