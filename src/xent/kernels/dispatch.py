"""Choose the implementation of a loss from the device, the dtype and the options; ``impl=`` overrides."""

from __future__ import annotations

import torch

from xent.losses import softmax

CROSS_ENTROPY_IMPLS = ("reference",)


def cross_entropy_rows_dispatch(
    impl: str | None, logits: torch.Tensor, target: torch.Tensor, options: softmax.SoftmaxOptions
) -> torch.Tensor:
    """Per-row cross-entropy losses ``(M,)`` of canonical logits ``(M, C)`` by the chosen implementation."""
    if impl is None:
        impl = "reference"
    if impl not in CROSS_ENTROPY_IMPLS:
        options_text = ", ".join(repr(name) for name in (None, *CROSS_ENTROPY_IMPLS))
        raise ValueError(f"impl must be one of {options_text}, got {impl!r}")
    return softmax.cross_entropy_rows(logits, target, options)
