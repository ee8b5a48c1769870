"""Choose the implementation of a loss from the device, the problem and the options; ``impl=`` overrides.

Every implementation takes canonical tensors — logits ``(M, C)``, class indices ``(M,)`` or probabilities
``(M, C)`` — and returns the reduced loss (``(M,)`` for ``reduction="none"``); validation happened before.
"""

from __future__ import annotations

import torch

from xent.kernels import chunked
from xent.kernels import linear as chunked_linear
from xent.losses import linear, softmax

CROSS_ENTROPY_IMPLS = ("reference", "chunked")

# Below this many logits the reference is as fast and keeps double backward; above it the chunked kernel wins on
# time and memory (measured with `xent bench ce`, see the README's Performance section).
CHUNKED_MIN_ELEMENTS = 1 << 16


def choose_cross_entropy(impl: str | None, logits: torch.Tensor, *, inplace_backward: bool) -> str:
    if impl is not None:
        if impl not in CROSS_ENTROPY_IMPLS:
            names = ", ".join(repr(name) for name in (None, *CROSS_ENTROPY_IMPLS))
            raise ValueError(f"impl must be one of {names}, got {impl!r}")
        if impl == "reference" and inplace_backward:
            raise ValueError("inplace_backward=True needs impl='chunked' (or None), got impl='reference'")
        return impl
    if inplace_backward:
        return "chunked"
    training = logits.requires_grad and torch.is_grad_enabled()
    return "chunked" if training and logits.numel() >= CHUNKED_MIN_ELEMENTS else "reference"


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
    if chosen == "chunked":
        return chunked.chunked_cross_entropy(logits, target, options, reduction, inplace_backward=inplace_backward)
    return softmax.reference_cross_entropy(logits, target, options, reduction)


LINEAR_CROSS_ENTROPY_IMPLS = ("reference", "chunked")


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
    return chunked_linear.chunked_linear_cross_entropy(
        input, linear_weight, linear_bias, target, options, reduction, chunk_size
    )
