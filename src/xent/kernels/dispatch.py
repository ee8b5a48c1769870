"""Choose the implementation of a loss from the device, the problem and the options; ``impl=`` overrides.

Every implementation takes canonical tensors — logits ``(M, C)``, class indices ``(M,)`` or probabilities
``(M, C)`` — and returns the reduced loss (``(M,)`` for ``reduction="none"``); validation happened before.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from xent.kernels import chunked
from xent.kernels import linear as chunked_linear
from xent.losses import linear, softmax

CROSS_ENTROPY_IMPLS = ("reference", "chunked", "triton")

# Below this many logits the reference is as fast and keeps double backward; above it the chunked kernel wins on
# time and memory (measured with `xent bench ce`, see the README's Performance section).
CHUNKED_MIN_ELEMENTS = 1 << 16


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or anywhere under the Triton interpreter, when triton is installed."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_kernel(device: torch.device):
    if not triton_usable(device):
        why = "the triton package is not installed (pip install 'xent[triton]')"
        if importlib.util.find_spec("triton") is not None:
            why = f"the tensors are on {device.type}; Triton needs CUDA (or TRITON_INTERPRET=1 to simulate it)"
        raise ValueError(f"impl='triton' cannot run here: {why}")
    from xent.kernels.triton import cross_entropy

    return cross_entropy.loss_and_grad_


def choose_cross_entropy(impl: str | None, logits: torch.Tensor, *, inplace_backward: bool) -> str:
    if impl is not None:
        if impl not in CROSS_ENTROPY_IMPLS:
            names = ", ".join(repr(name) for name in (None, *CROSS_ENTROPY_IMPLS))
            raise ValueError(f"impl must be one of {names}, got {impl!r}")
        if impl == "reference" and inplace_backward:
            raise ValueError("inplace_backward=True needs impl='chunked' (or None), got impl='reference'")
        return impl
    fused = "triton" if logits.device.type == "cuda" and triton_usable(logits.device) else "chunked"
    if inplace_backward:
        return fused
    training = logits.requires_grad and torch.is_grad_enabled()
    return fused if training and logits.numel() >= CHUNKED_MIN_ELEMENTS else "reference"


def dispatch_cross_entropy(
    impl: str | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    options: softmax.SoftmaxOptions,
    reduction: str,
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """The reduced cross-entropy of canonical tensors by the chosen implementation."""
    chosen = choose_cross_entropy(impl, logits, inplace_backward=inplace_backward)
    if chosen == "reference":
        return softmax.reference_cross_entropy(logits, target, options, reduction)
    kernel = _triton_kernel(logits.device) if chosen == "triton" else None
    return chunked.chunked_cross_entropy(
        logits, target, options, reduction, inplace_backward=inplace_backward, kernel=kernel
    )


LINEAR_CROSS_ENTROPY_IMPLS = ("reference", "chunked", "triton")


def dispatch_linear_cross_entropy(
    impl: str | None,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    options: softmax.SoftmaxOptions,
    reduction: str,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The reduced linear cross-entropy of canonical tensors (``input (N, D)``) by the chosen implementation."""
    if impl is not None and impl not in LINEAR_CROSS_ENTROPY_IMPLS:
        names = ", ".join(repr(name) for name in (None, *LINEAR_CROSS_ENTROPY_IMPLS))
        raise ValueError(f"impl must be one of {names}, got {impl!r}")
    if impl == "reference":
        return linear.reference_linear_cross_entropy(input, linear_weight, linear_bias, target, options, reduction)
    if impl is None:
        impl = "triton" if input.device.type == "cuda" and triton_usable(input.device) else "chunked"
    kernel = _triton_kernel(input.device) if impl == "triton" else None
    return chunked_linear.chunked_linear_cross_entropy(
        input, linear_weight, linear_bias, target, options, reduction, chunk_size, kernel=kernel
    )
