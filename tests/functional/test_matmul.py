"""The products of the pair sums (oneDNN or ``torch.bmm`` on the CPU, symmetric Gram strips) equal float64 products.

The reference is ``torch.float64`` matrix multiplication of the same operands; the float32 paths
must agree to float32 rounding (relative 1e-5 of the largest entry), whatever the strides. The
numeric tests run on both CPU libraries (fixture ``product_library``), whichever this CPU's default.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from lightning_hsu.functional import _matmul, hyperspherical_energy
from lightning_hsu.functional._matmul import batched_matmul, gram, matmul_into

from .reference import concat_energy, value_and_grad


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_float32_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours.double(), ref, rtol=0.0, atol=1e-5 * scale)


OPERANDS = {
    "contiguous": lambda a, b: (a, b),
    "transposed b": lambda a, b: (a, b.transpose(1, 2).contiguous().transpose(1, 2)),
    "transposed a": lambda a, b: (a.transpose(1, 2).contiguous().transpose(1, 2), b),
    "column slice of a": lambda a, b: (torch.cat([a, a], dim=2)[:, :, 3 : 3 + a.shape[2]], b),
    # an einsum's permuted output: oneDNN would take a reference kernel, so it is copied first
    "row slice of column-major b": lambda a, b: (
        a,
        torch.cat([b, b], dim=1).transpose(1, 2).contiguous().transpose(1, 2)[:, 7 : 7 + b.shape[1]],
    ),
}


@pytest.mark.usefixtures("product_library")
@pytest.mark.parametrize("layout", list(OPERANDS))
@pytest.mark.parametrize("batch", [1, 3])
def test_batched_matmul_equals_float64_product_for_any_strides(layout: str, batch: int) -> None:
    a, b = OPERANDS[layout](_randn(batch, 37, 50), _randn(batch, 50, 29, seed=1))
    _assert_float32_close(batched_matmul(a, b), a.double() @ b.double())


@pytest.mark.parametrize(("m", "k", "n", "calls"), [(9, 700, 3, 9), (9, 3, 700, 9), (300, 40, 29, 5)])
def test_large_weights_go_to_onednn_in_blocks_and_equal_the_float64_product(
    m: int, k: int, n: int, calls: int, product_library: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weight above 256 entries is cut: a long contraction (700) into summed column blocks of
    85, many weight rows (700) into row blocks of 85, 29 x 40 into summed column blocks of 8."""
    monkeypatch.setattr(_matmul, "WEIGHT_BLOCK_ELEMENTS", 256)
    seen: list[tuple[int, ...]] = []
    if product_library == "onednn":
        op = _matmul.onednn_operator()

        def counting(x, w, *rest):
            seen.append(tuple(w.shape))
            return op(x, w, *rest)

        monkeypatch.setattr(_matmul, "_onednn_linear", lambda: counting)
    a, b = _randn(1, m, k), _randn(1, k, n, seed=1)
    _assert_float32_close(batched_matmul(a, b), a.double() @ b.double())
    assert len(seen) == (calls if product_library == "onednn" else 0)
    assert all(rows * inner <= 256 for rows, inner in seen)


@pytest.mark.usefixtures("product_library")
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("rows_per_product", [2**16, 4])
def test_matmul_into_writes_or_accumulates_into_a_row_block(
    accumulate: bool, rows_per_product: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 4 rows (of 64 entries) per product the 11 output rows take three products (4 + 4 + 3)."""
    monkeypatch.setattr(_matmul, "MATMUL_INTO_ELEMENTS", rows_per_product * 64)
    a, b = _randn(2, 11, 40), _randn(2, 40, 64, seed=1)
    big = _randn(2, 30, 64, seed=2)
    expected = big.double().clone()
    block = a.double() @ b.double()
    expected[:, 5:16] = expected[:, 5:16] + block if accumulate else block
    matmul_into(big[:, 5:16], a, b, accumulate=accumulate)
    _assert_float32_close(big, expected)


@pytest.mark.usefixtures("product_library")
@pytest.mark.parametrize(("n", "d"), [(300, 2100), (256, 2048), (64, 4096), (300, 100)])
def test_gram_is_the_exactly_symmetric_float64_gram(n: int, d: int) -> None:
    """(300, 2100) and (256, 2048) take the strips (three and two of them), the others one product."""
    x = _randn(2, n, d)
    ours = gram(x)
    _assert_float32_close(ours, x.double() @ x.double().transpose(1, 2))
    assert torch.equal(ours, ours.transpose(1, 2))


@pytest.mark.parametrize("cpu_kernel", ["auto", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_in_strips_is_exactly_symmetric_with_either_mirror(
    cpu_kernel: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mirrored by the compiled library's tiles or by ATen (``LIGHTNING_HSU_CPU_KERNEL=0``), a Gram matrix in
    strips equals its transpose, the strips' diagonal tiles included (float64 products of a 128-row tile
    with itself are not symmetric to the last bit), and the float64 product. 1024 rows: a power of two."""
    monkeypatch.setenv("LIGHTNING_HSU_CPU_KERNEL", cpu_kernel)
    x = _randn(2, 1024, 512).to(dtype)
    assert _matmul.gram_in_strips(x)
    ours = gram(x)
    assert torch.equal(ours, ours.transpose(1, 2))
    expected = x.double() @ x.double().transpose(1, 2)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-3)


def test_products_that_need_autograd_or_float64_keep_torch_bmm() -> None:
    a = _randn(1, 8, 5).requires_grad_()
    b = _randn(1, 5, 4, seed=1)
    out = batched_matmul(a, b)
    assert out.grad_fn is not None  # differentiable: torch.bmm, not the oneDNN operator
    out.sum().backward()
    torch.testing.assert_close(a.grad, b.sum(-1).unsqueeze(1).expand(1, 8, 5))
    assert torch.equal(batched_matmul(a.detach().double(), b.double()), torch.bmm(a.detach().double(), b.double()))


def test_float32_cpu_products_take_the_onednn_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    op = _matmul.onednn_operator()
    if op is None:
        pytest.skip("this PyTorch has no oneDNN float32 matmul")
    calls: list[tuple[int, ...]] = []

    def counting(x, w, *args):
        calls.append(tuple(x.shape))
        return op(x, w, *args)

    monkeypatch.setattr(_matmul, "_onednn_linear", lambda: counting)
    batched_matmul(_randn(2, 4, 3), _randn(2, 3, 5))
    assert calls == [(4, 3), (4, 3)]


@pytest.fixture
def fresh_choice(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The library choice read again after the test changes the environment or the CPU's vendor."""
    chosen = _matmul._onednn_linear
    chosen.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    chosen.cache_clear()


@pytest.mark.parametrize(
    ("value", "vendor", "avx512", "enabled"),
    [
        (None, "AuthenticAMD", True, True),  # oneDNN's products ran at twice MKL's speed on AMD Zen 5
        ("auto", "AuthenticAMD", True, True),
        (None, "", True, True),
        (None, "AuthenticAMD", False, False),  # Zen 3: both libraries on AVX2, MKL 1.07-1.18x faster
        (None, "", False, False),
        (None, "GenuineIntel", True, False),  # MKL is tuned for Intel CPUs: torch.bmm
        (" AUTO ", "GenuineIntel", True, False),
        ("1", "GenuineIntel", True, True),
        ("1", "AuthenticAMD", False, True),
        ("0", "AuthenticAMD", True, False),
        ("0", "GenuineIntel", False, False),
    ],
)
def test_the_cpu_and_the_environment_variable_choose_the_product_library(
    value: str | None, vendor: str, avx512: bool, enabled: bool, fresh_choice: pytest.MonkeyPatch
) -> None:
    if _matmul.onednn_operator() is None:
        pytest.skip("this PyTorch has no oneDNN float32 matmul")
    if value is None:
        fresh_choice.delenv(_matmul.ONEDNN_ENV, raising=False)
    else:
        fresh_choice.setenv(_matmul.ONEDNN_ENV, value)
    fresh_choice.setattr(_matmul, "cpu_vendor", lambda: vendor)
    fresh_choice.setattr(_matmul, "cpu_has_avx512", lambda: avx512)
    assert _matmul.onednn_matmul_enabled() is enabled
    kinds: list[str] = []
    fresh_choice.setattr(_matmul, "chosen_threads", lambda work, kind: kinds.append(kind) or contextlib.nullcontext())
    a, b = _randn(1, 6, 70), _randn(1, 70, 4, seed=1)
    _assert_float32_close(batched_matmul(a, b), a.double() @ b.double())
    assert kinds == [_matmul.ONEDNN_KIND if enabled else "torch.float32 bmm"]


def test_an_unknown_product_library_setting_is_refused_naming_the_variable(
    fresh_choice: pytest.MonkeyPatch,
) -> None:
    fresh_choice.setenv(_matmul.ONEDNN_ENV, "yes")
    with pytest.raises(ValueError, match=r"LIGHTNING_HSU_ONEDNN_MATMUL='yes': choose one of auto, 1, 0"):
        _matmul.onednn_matmul_enabled()


def test_the_environment_variable_holds_in_a_fresh_process() -> None:
    code = "from lightning_hsu.functional._matmul import onednn_matmul_enabled; print(onednn_matmul_enabled())"
    env = {_matmul.ONEDNN_ENV: "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_cpu_vendor_and_avx512_are_read_from_proc_cpuinfo() -> None:
    try:
        with open("/proc/cpuinfo") as info:
            text = info.read()
    except OSError:
        text = ""
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, flags=re.MULTILINE)
    flags = re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)
    if vendor is None or flags is None:
        pytest.skip("no vendor_id or flags in /proc/cpuinfo here")
    assert _matmul.cpu_vendor() == vendor.group(1)
    assert _matmul.cpu_has_avx512() == ("avx512f" in flags.group(1).split())


@pytest.mark.parametrize(
    ("processor", "vendor"),
    [("Intel64 Family 6 Model 85 Stepping 7, GenuineIntel", "GenuineIntel"), ("AMD64 Family 25", "")],
)
def test_without_proc_cpuinfo_the_vendor_comes_from_the_processor_name(
    processor: str, vendor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_file(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr("builtins.open", no_file)
    monkeypatch.setattr(_matmul.platform, "processor", lambda: processor)
    assert _matmul.cpu_vendor() == vendor


@pytest.mark.usefixtures("product_library")
@pytest.mark.parametrize("half_space", [False, True])
def test_float32_energy_of_a_conv_sized_layer_matches_the_float64_concatenation(half_space: bool) -> None:
    """256 x 2304 (a ResNet layer-3 conv): the oneDNN products, the Gram strips and the folded
    projection together give the official value and gradient to float32 accuracy."""
    w = _randn(256, 2304)
    ours, ours_grad = value_and_grad(lambda x: hyperspherical_energy(x, power=2.0, half_space=half_space), w)
    ref, ref_grad = value_and_grad(lambda x: concat_energy(x, 2.0, half_space), w.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0.0)
    _assert_float32_close(ours_grad, ref_grad)


def test_torch_compile_of_the_energy_traces_torch_bmm_and_equals_eager() -> None:
    """Inductor cannot lower the oneDNN operator: a compiled penalty must take torch.bmm."""
    w = _randn(256, 2304)
    compiled = torch.compile(lambda x: hyperspherical_energy(x, half_space=True))
    ours, ours_grad = value_and_grad(compiled, w)
    eager, eager_grad = value_and_grad(lambda x: hyperspherical_energy(x, half_space=True), w)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=0.0)
    # two float32 product orders (MKL traced, oneDNN eager): entries agree to ~sqrt(n) roundings of the largest
    torch.testing.assert_close(ours_grad, eager_grad, rtol=1e-5, atol=1e-5 * eager_grad.abs().max().item())


@pytest.mark.usefixtures("product_library")
@pytest.mark.parametrize("half_space", [False, True])
def test_float32_comhe_projections_and_gradient_equal_float64(half_space: bool) -> None:
    from lightning_hsu.functional import compressive_energy

    w = _randn(96, 300, seed=5)
    proj = _randn(20, 40, 300, seed=6)

    def value_and_gradient(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = w.to(dtype).detach().requires_grad_(True)
        value = compressive_energy(x, proj.to(dtype), half_space=half_space)
        value.backward()
        return value.detach(), x.grad

    value, grad = value_and_gradient(torch.float32)
    ref_value, ref_grad = value_and_gradient(torch.float64)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=0.0)
    _assert_float32_close(grad, ref_grad)
