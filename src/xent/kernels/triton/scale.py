"""``tensor *= factor`` in place, where the factor lives on the device and is usually exactly 1.

A fused loss forms its gradient in the forward pass and multiplies it by ``grad_output`` in backward. That factor is
1 for a plain ``loss.backward()``, but reading it on the host would stall the GPU's queue; this kernel reads it on
the device instead, and every program returns before touching the tensor when it is 1 — a pass over a 1 GB gradient
(0.7 ms of an H100's bandwidth) becomes a launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


PROGRAMS_PER_SM = 8  # a fixed grid striding over the tensor: a launch of one program per block would itself
# cost ~1 ms for a 4 GB tensor on an H100, even when every program returns at once


@triton.jit
def _scale_unless_one_kernel(x_ptr, factor_ptr, numel, BLOCK: tl.constexpr):
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        stride = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, numel, stride):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            tl.store(x_ptr + offs, (x * factor).to(x_ptr.dtype.element_ty), mask=mask)


def scale_unless_one_(tensor: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply the contiguous ``tensor`` by the one-element ``factor`` in place (in float32, rounded once)."""
    if not tensor.is_contiguous() or factor.numel() != 1:
        raise ValueError(
            f"scale_unless_one_ needs a contiguous tensor and a one-element factor, got strides {tensor.stride()} "
            f"and factor shape {tuple(factor.shape)}"
        )
    if tensor.numel():
        processors = torch.cuda.get_device_properties(tensor.device).multi_processor_count if tensor.is_cuda else 4
        grid = (min(triton.cdiv(tensor.numel(), BLOCK), PROGRAMS_PER_SM * processors),)
        _scale_unless_one_kernel[grid](tensor, factor.to(tensor.device).reshape(1), tensor.numel(), BLOCK=BLOCK)
