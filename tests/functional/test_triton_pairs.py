"""The fused Triton kernel of the pair sums (``functional/_triton_pairs.py``).

Without a GPU the kernel runs in Triton's interpreter, which must be switched on before Triton is
imported; this suite imports Triton early (``torch._dynamo`` does), so the parity cases
(``fused_cases.py``, shared with the C kernel) run in a fresh process. On a GPU (``-m gpu``) the compiled kernel is
compared with the eager path and the float64 formula, and replayed from a CUDA graph. Skipped
without Triton.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from lightning_hsu.functional import hyperspherical_energy, pairwise
from lightning_hsu.functional.kernels import RieszKernel

from .reference import pairwise_energy
from .test_cpu_pairs import run_fused_cases

MODULE = "lightning_hsu.functional._triton_pairs"


def test_importing_the_package_does_not_import_the_kernel_module() -> None:
    code = f"import sys, lightning_hsu, lightning_hsu.functional; print({MODULE!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cpu_tensors_take_triton_only_in_its_interpreter_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` (the default) takes Triton on CUDA only; ``always`` on the CPU needs Triton's interpreter.
    Otherwise a CPU tensor takes the C kernel, or with its switch off the eager passes."""
    w = torch.randn(1, 8, 3)
    kernel = RieszKernel(2.0)
    monkeypatch.setenv(pairwise.CPU_KERNEL_ENV, "0")
    monkeypatch.delenv(pairwise.TRITON_ENV, raising=False)
    assert pairwise._fused_pairs(w, kernel) is None
    monkeypatch.setenv(pairwise.TRITON_ENV, "always")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert pairwise._fused_pairs(w, kernel) is None


@pytest.mark.slow
def test_interpreted_parity_cases_pass_in_a_fresh_process() -> None:
    pytest.importorskip("triton")
    run_fused_cases("triton", TRITON_INTERPRET="1", **{pairwise.TRITON_ENV: "always"})


# ---- on a GPU: the compiled kernel ----------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _value_and_grad(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = w.detach().clone().requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


def _neurons(case: str, n: int, d: int) -> torch.Tensor:
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if case == "duplicate":
        w = 100.0 * w
        w[5] = w[2]
    return w.cuda()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("half_space", [False, True], ids=["full", "half"])
@pytest.mark.parametrize("case", ["random", "duplicate"])
@pytest.mark.parametrize(("n", "d"), [(37, 64), (130, 64), (512, 576), (4096, 512)])
def test_cuda_energy_matches_eager_and_float64(
    n: int, d: int, case: str, half_space: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("triton")
    from lightning_hsu.functional import _triton_pairs

    def energy(x: torch.Tensor) -> torch.Tensor:
        return hyperspherical_energy(x, power=2.0, half_space=half_space, check_finite=False)

    w = _neurons(case, n, d)
    monkeypatch.setenv(pairwise.TRITON_ENV, "auto")
    value, grad = _value_and_grad(energy, w.float())
    assert _triton_pairs._READY.get(w.device) is True, "the fused kernel did not launch"
    monkeypatch.setenv(pairwise.TRITON_ENV, "0")
    eager_value, eager_grad = _value_and_grad(energy, w.float())
    ref_value, ref_grad = _value_and_grad(lambda x: pairwise_energy(x, 2.0, half_space), w)
    scale = float(ref_grad.abs().max())
    torch.testing.assert_close(value, eager_value, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-4 * scale)


@cuda
@pytest.mark.gpu
def test_cuda_graph_of_the_fused_path_replays_the_eager_values(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from lightning_hsu.cuda_graphs import GraphedPenalties

    def penalty(x: torch.Tensor) -> torch.Tensor:
        return hyperspherical_energy(x, half_space=True, check_finite=False)

    w = torch.randn(512, 576, device="cuda", requires_grad=True)
    monkeypatch.setenv(pairwise.TRITON_ENV, "auto")
    graphs = GraphedPenalties([penalty], [w])
    value = graphs()
    value.sum().backward()
    assert w.grad is not None
    monkeypatch.setenv(pairwise.TRITON_ENV, "0")
    eager_value, eager_grad = _value_and_grad(penalty, w.detach())
    torch.testing.assert_close(value.detach()[0], eager_value, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, eager_grad, rtol=1e-4, atol=1e-5 * float(eager_grad.abs().max()))
