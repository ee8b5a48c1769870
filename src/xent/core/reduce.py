"""Reduction semantics shared by every loss."""

from __future__ import annotations

import torch


def safe_divide(total: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``total / denominator``, and 0 with a zero gradient where the denominator is 0.

    This is the "nothing to average" case (every target ignored, or an empty batch), where PyTorch returns NaN.
    Both branches stay finite so that ``torch.where``'s backward multiplies a finite gradient by 0, never inf by 0,
    and no host synchronisation is needed to take the decision.
    """
    nonzero = denominator != 0
    quotient = total / torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, quotient, torch.zeros_like(quotient))


def reduce_loss(loss: torch.Tensor, reduction: str, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-element losses.

    Args:
        loss: per-element losses, any shape.
        reduction: ``"none"`` returns ``loss``; ``"sum"`` its sum; ``"mean"`` the sum divided by ``denominator``.
        denominator: what ``"mean"`` divides by, e.g. the total class weight of the non-ignored targets;
            defaults to the number of elements. A zero denominator gives 0 (see :func:`safe_divide`).
    """
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if denominator is None:
        denominator = torch.tensor(loss.numel(), dtype=total.dtype, device=total.device)
    return safe_divide(total, denominator.to(total.dtype))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are accumulated in float32; float32 and float64 keep their own precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
