"""Error of the pair sums with TF32 or bfloat16 product operands (``precision=``), and their time.

For each case, the value and gradient (with respect to the raw weights) of the penalty computed
in float32 with ``precision="float32"``, ``"tf32"`` and ``"bfloat16"`` against the same penalty in
float64 (the package's float64 path, itself tested against the pair-by-pair formula):

- **value**: relative error \\(|E - E_{64}| / |E_{64}|\\);
- **gradient**: relative error of the whole gradient, \\(\\lVert g - g_{64}\\rVert / \\lVert g_{64}\\rVert\\),
  and the cosine between \\(g\\) and \\(g_{64}\\) (the direction the optimiser follows).

Cases: Gaussian random neurons (a network at initialisation) in the shapes of a CIFAR ResNet-18
(half-space MHE, s = 2, as the ``mhe`` preset; the classifier full space; s = 0 and s = 1 at one
shape; CoMHE with 20 projections to 40 dimensions), then 512 x 4608 random neurons with 16 pairs
of near-duplicates at a fixed angle (0.5 to 16 degrees), where the smallest distances, which
dominate the energy, are what the rounding of the cosines disturbs.

On the CPU the reduced operands are emulated (rounded, then multiplied in float32: the same
numbers as the hardware up to the order of the sums; TF32 hardware may truncate instead of
rounding, up to twice the error); on CUDA they are the hardware's, and ``--time`` adds the
forward + backward time of each precision.

Usage: ``python benchmarks/bench_precision.py [--device cuda] [--time] [--smoke]``.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable

import torch
from _common import add_common_args, apply_threads, device_arg, machine, ms, table, time_methods

from lightning_hsu.functional import compressive_energy, hyperspherical_energy

PRECISIONS = ("float32", "tf32", "bfloat16")


def near_duplicates(w: torch.Tensor, degrees: float, pairs: int = 16, seed: int = 1) -> torch.Tensor:
    """``w`` with rows ``2k + 1`` replaced by row ``2k`` turned by ``degrees`` (k < ``pairs``)."""
    g = torch.Generator().manual_seed(seed)
    out = w.clone()
    angle = math.radians(degrees)
    for k in range(pairs):
        a = w[2 * k]
        other = torch.randn(w.shape[1], generator=g, dtype=w.dtype)
        other -= (other @ a) / (a @ a) * a  # orthogonal to a
        out[2 * k + 1] = math.cos(angle) * a + math.sin(angle) * other / other.norm() * a.norm()
    return out


def value_and_grad(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = w.detach().clone().requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def errors(fn: Callable[..., torch.Tensor], w64: torch.Tensor, device: torch.device) -> dict[str, tuple[float, ...]]:
    ref_value, ref_grad = value_and_grad(fn, w64.to(device))
    out = {}
    for precision in PRECISIONS:
        value, grad = value_and_grad(functools.partial(fn, precision=precision), w64.float().to(device))
        value_error = abs(float(value) - float(ref_value)) / abs(float(ref_value))
        grad_error = float((grad.double() - ref_grad).norm() / ref_grad.norm())
        cosine = float(torch.nn.functional.cosine_similarity(grad.double().flatten(), ref_grad.flatten(), dim=0))
        out[precision] = (value_error, grad_error, cosine)
    return out


def cases(smoke: bool) -> list[tuple[str, Callable[..., torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)

    def randn(n: int, d: int) -> torch.Tensor:
        return torch.randn(n, d, generator=g, dtype=torch.float64)

    half = functools.partial(hyperspherical_energy, half_space=True, check_finite=False)
    # the ResNet-18's conv shapes: the stem and shortcuts are narrow (crowded), the others wide
    shapes = [(64, 72), (128, 144)] if smoke else [(64, 27), (512, 256), (64, 576), (256, 2304), (512, 4608)]
    out = [(f"random {n} x {d}, half-space MHE s=2", half, randn(n, d)) for n, d in shapes]
    n, d = shapes[-1]
    base = randn(n, d)
    for power in (0.0, 1.0):
        fn = functools.partial(hyperspherical_energy, half_space=True, power=power, check_finite=False)
        out.append((f"random {n} x {d}, half-space MHE s={power:g}", fn, base))
    out.append(
        ("random 10 x 512 classifier, full-space MHE s=2", functools.partial(hyperspherical_energy), randn(10, 512))
    )
    projections = torch.randn(20, 40, d, generator=g, dtype=torch.float64)

    def comhe(w: torch.Tensor, precision: str = "float32") -> torch.Tensor:
        return compressive_energy(w, projections.to(w), half_space=True, check_finite=False, precision=precision)

    out.append((f"random {n} x {d}, half-space CoMHE 20 x 40", comhe, base))
    for degrees in (0.5, 2.0, 8.0) if smoke else (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        out.append(
            (f"{n} x {d} with 16 pairs {degrees:g} deg apart, half-space MHE s=2", half, near_duplicates(base, degrees))
        )
    return out


def closest_angle(w: torch.Tensor, half_space: bool) -> float:
    """The smallest angle between two neurons, in degrees (in half space between lines: +-w)."""
    unit = torch.nn.functional.normalize(w.double(), dim=-1)
    cos = (unit @ unit.T).fill_diagonal_(-1.0 if not half_space else 0.0)
    largest = float(cos.abs().max() if half_space else cos.max())
    return math.degrees(math.acos(min(1.0, largest)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--time", action="store_true", help="also time forward + backward per precision (CUDA)")
    parser.add_argument("--smoke", action="store_true", help="small shapes (a CPU check of the script)")
    args = parser.parse_args()
    apply_threads(args.threads)
    device = device_arg(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # "float32" means float32 here
    start = time.perf_counter()
    print(f"Machine: {machine()}\n")
    kind = "hardware" if device.type == "cuda" else "emulated (rounded operands, float32 products)"
    print(f"### Errors against float64, {device.type}: TF32 and bfloat16 operands {kind}\n")
    header = ["case", "closest pair, deg"] + [f"{p}: value, gradient rel. error, cosine" for p in PRECISIONS]
    rows = []
    timed = []
    for name, fn, w64 in cases(args.smoke):
        result = errors(fn, w64, device)
        angle = closest_angle(w64, half_space="half-space" in name)
        rows.append(
            [name, f"{angle:.3g}"] + [f"{v:.1e}, {gr:.1e}, {c:.6f}" for v, gr, c in (result[p] for p in PRECISIONS)]
        )
        if args.time and device.type == "cuda" and name.startswith("random") and "MHE s=2" in name:
            w = w64.float().to(device).requires_grad_()

            def run(precision: str, w: torch.Tensor = w, fn: Callable[..., torch.Tensor] = fn) -> None:
                w.grad = None
                fn(w, precision=precision).backward()

            timings = time_methods({p: functools.partial(run, p) for p in PRECISIONS}, device, 15)
            timed.append([name] + [ms(timings[p].wall) for p in PRECISIONS])
    print(table(header, rows))
    if timed:
        print("\n### Forward + backward, eager, ms (median of 15)\n")
        print(table(["case", *PRECISIONS], timed))
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
