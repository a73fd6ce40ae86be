"""Page faults and time per call of a penalty, at one thread and at all, with glibc's heap as it
comes and kept from shrinking.

The penalty's large temporaries (MGD's float64 copy of the neurons and its gradient, 19 MiB each at
512 x 4608) are freed at the top of glibc's heap; once the free top exceeds glibc's trim threshold
it goes back to the kernel (``brk``), and the next call faults its pages in again (4 KiB each, the
kernel zeroing every one). Whether that happens depends on the order of allocations and frees,
which differs between one thread and the many-thread path (`lightning_hsu.functional._matmul.
one_thread_graph` keeps the penalty's graph inside its own node). Each heap setting runs in its
own process (``mallopt`` cannot be undone); inside it the thread counts alternate, each timed after
warm-up calls. Minor page faults come from ``getrusage``.

Usage: ``python benchmarks/bench_heap_faults.py [--cases mgd,uniformity,mhe] [--calls 20] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import machine, names_of, steady_heap, table

from lightning_hsu.regularizers.registry import REGULARIZERS, make_regularizer

HEAPS = ("as it comes", "kept")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(cases: list[str], calls: int, rounds: int, threads: int, heap: str) -> None:
    """Print, as JSON lines, faults and ms per call of forward and backward for each case and thread count."""
    if heap == "kept":
        steady_heap()
    for name in cases:
        torch.manual_seed(0)
        w = torch.randn(512, 4608, requires_grad=True)
        regularizer = make_regularizer(name, half_space=True)
        step = iter(range(10**9))
        for rnd in range(rounds):
            for count in (threads, 1) if rnd % 2 == 0 else (1, threads):
                torch.set_num_threads(count)
                for _ in range(5):  # warm-up in this setting
                    w.grad = None
                    regularizer(w, step=next(step)).backward()
                forward, backward, seconds = [], [], []
                for _ in range(calls):
                    w.grad = None
                    f0, t0 = _faults(), time.perf_counter()
                    loss = regularizer(w, step=next(step))
                    f1 = _faults()
                    loss.backward()
                    f2, t2 = _faults(), time.perf_counter()
                    forward.append(f1 - f0)
                    backward.append(f2 - f1)
                    seconds.append(t2 - t0)
                row = {"case": name, "threads": count, "round": rnd, "heap": heap}
                row |= {"forward": statistics.fmean(forward), "backward": statistics.fmean(backward)}
                row["ms"] = 1e3 * statistics.fmean(seconds)
                print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="mgd,uniformity,mhe", help="regularisers at 512 x 4608, half space")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the thread counts per heap")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", choices=HEAPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = names_of(parser, "--cases", args.cases, REGULARIZERS)
    if args.child:
        child(cases, args.calls, args.rounds, args.threads, args.child)
        return
    print(f"Machine: {machine()}; idle; {args.calls} calls per cell, forward + backward\n")
    rows = []
    for heap in HEAPS:
        command = [sys.executable, __file__, "--cases", ",".join(cases), "--calls", str(args.calls)]
        command += ["--rounds", str(args.rounds), "--threads", str(args.threads), "--child", heap]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            r = json.loads(line)
            counts = [f"{r['forward']:.0f}", f"{r['backward']:.0f}", f"{r['ms']:.1f}"]
            rows.append([r["case"], heap, r["threads"], r["round"], *counts])
    header = ["penalty", "glibc heap", "threads", "round", "faults, forward", "faults, backward", "ms per call"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
