"""What the fused pair-sum kernels (`_triton_pairs` on CUDA, `_cpu_pairs` on the CPU) take from a kernel.

Both restate the formulas of `kernels.RieszKernel`, `kernels.GaussianKernel` and
`kernels.ClosestPairsKernel` in their own language; a launch names the family and the Riesz power's
formula by the integers below (the C source and the Triton functions compare with the same literals).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_hsu.functional.kernels import ClosestPairsKernel, GaussianKernel, PairKernel, RieszKernel

#: Kernel families, the ``KIND`` of a launch.
RIESZ, GAUSSIAN, CLOSEST_PAIRS = 0, 1, 2
#: Riesz powers with their own formula, the ``POWER_CASE`` of a launch: s = 0 (log), s = 2, s = 1, else.
LOG_POWER, INVERSE_SQUARE, INVERSE, OTHER_POWER = 0, 1, 2, 3


def supports(kernel: PairKernel) -> bool:
    """Whether ``kernel`` has a fused form (exactly these classes: a subclass may change the formula)."""
    return type(kernel) in (RieszKernel, GaussianKernel, ClosestPairsKernel)


def family(kernel: PairKernel) -> tuple[int, int, float, float, float | Tensor]:
    """``(KIND, POWER_CASE, power, 2t, per-batch parameter)`` of a supported kernel."""
    if isinstance(kernel, RieszKernel):
        case = {0.0: LOG_POWER, 2.0: INVERSE_SQUARE, 1.0: INVERSE}.get(kernel.power, OTHER_POWER)
        return RIESZ, case, float(kernel.power), 0.0, 0.0
    if isinstance(kernel, GaussianKernel):
        return GAUSSIAN, OTHER_POWER, 0.0, 2.0 * kernel.t, kernel.shift
    assert isinstance(kernel, ClosestPairsKernel)
    return CLOSEST_PAIRS, OTHER_POWER, 0.0, 0.0, kernel.threshold


def per_batch_parameter(parameter: float | Tensor, like: Tensor) -> tuple[Tensor, int]:
    """A shift or threshold as a float32 tensor on ``like``'s device and its batch stride (0: shared)."""
    if isinstance(parameter, Tensor):
        flat = parameter.detach().to(device=like.device, dtype=torch.float32).reshape(-1).contiguous()
    else:
        flat = like.new_full((1,), float(parameter))
    return flat, (0 if flat.numel() == 1 else 1)


def launch_parameters(
    block: Tensor, kernel: PairKernel, row_scale: Tensor | None, col_scale: Tensor | None
) -> tuple[int, int, float, float, Tensor, int]:
    """``(KIND, POWER_CASE, power, 2t, parameter, its batch stride)`` of one fused call on ``block``, after
    the check both kernels make of their arguments: raw products (``col_scale``) fold the projection."""
    if col_scale is not None and row_scale is None:
        raise ValueError("col_scale needs row_scale (raw products fold the projection)")
    kind, power_case, power, two_t, parameter = family(kernel)
    param, stride = per_batch_parameter(parameter, block)
    return kind, power_case, power, two_t, param, stride
