"""Choose the implementation of a loss from the device, the problem and the options; ``impl=`` overrides.

Every implementation takes canonical tensors — logits ``(M, C)``, class indices ``(M,)`` or probabilities
``(M, C)`` — and returns the reduced loss (``(M,)`` for ``reduction="none"``); validation happened before.
"""

from __future__ import annotations

import os

import torch

from xent.core.reference import reference_cross_entropy, reference_linear_cross_entropy
from xent.core.rowloss import RowLoss
from xent.kernels import chunked
from xent.kernels import linear as chunked_linear
from xent.kernels.triton import triton_installed

IMPLS = ("reference", "chunked", "triton")

# Below this many logits the reference is as fast and keeps double backward; above it the fused kernel wins on time
# and memory (0.96× the reference's time at 51k logits, 0.60× at 256k, 0.2× from 1M, on the CPU).
CHUNKED_MIN_ELEMENTS = 1 << 16


def _check_impl(impl: str | None) -> None:
    if impl is not None and impl not in IMPLS:
        names = ", ".join(repr(name) for name in (None, *IMPLS))
        raise ValueError(f"impl must be one of {names}, got {impl!r}")


def fused_impl(device: torch.device) -> str:
    """The fused implementation for a device: Triton on CUDA when it is installed, chunked PyTorch otherwise."""
    return "triton" if device.type == "cuda" and triton_usable(device) else "chunked"


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or anywhere under the Triton interpreter, when triton is installed."""
    if not triton_installed():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_kernel(device: torch.device) -> chunked.RowKernel:
    if not triton_usable(device):
        why = "the triton package is not installed (pip install 'xent[triton]')"
        if triton_installed():
            why = f"the tensors are on {device.type}; Triton needs CUDA (or TRITON_INTERPRET=1 to simulate it)"
        raise ValueError(f"impl='triton' cannot run here: {why}")
    from xent.kernels.triton import cross_entropy

    return cross_entropy.loss_and_grad_


def row_kernel(impl: str | None, device: torch.device) -> chunked.RowKernel:
    """The row kernel of a fused implementation (``None``: the device's)."""
    _check_impl(impl)
    if impl == "reference":
        raise ValueError("impl='reference' has no row kernel")
    impl = impl or fused_impl(device)
    return _triton_kernel(device) if impl == "triton" else chunked.loss_and_grad_


def choose_cross_entropy(
    impl: str | None, logits: torch.Tensor, *, inplace_backward: bool, extra_grads: bool = False
) -> str:
    """The implementation to run. ``extra_grads``: a target or class weight requires grad, which the fused kernels
    would get by recomputing the reference in backward — so the automatic choice is the reference itself."""
    _check_impl(impl)
    if impl is not None:
        if impl == "reference" and inplace_backward:
            raise ValueError(
                "inplace_backward=True needs a fused kernel (impl 'chunked', 'triton' or None), got 'reference'"
            )
        return impl
    fused = fused_impl(logits.device)
    if inplace_backward:
        return fused
    # Evaluation too: the fused kernel forms no gradient then, and the reference's materialised log-softmax is
    # slower (2.5–3× PyTorch's time on a busy 2-core machine, benchmarks/contention.py) and a logits-sized buffer.
    return fused if not extra_grads and logits.numel() >= CHUNKED_MIN_ELEMENTS else "reference"


# Tensors of a description that the fused kernels do not differentiate (class weights and targets they do).
UNDIFFERENTIATED = ("alpha", "token_weight", "class_offset", "target_margin")


def _requiring_grad(options: RowLoss) -> list[str]:
    if not torch.is_grad_enabled():
        return []
    return [name for name in UNDIFFERENTIATED if (value := getattr(options, name)) is not None and value.requires_grad]


def choose_softmax_loss(
    impl: str | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    options: RowLoss,
    *,
    inplace_backward: bool = False,
) -> str:
    """The implementation that runs a description: ``impl`` checked against what each one supports, or the
    automatic choice."""
    undifferentiated = _requiring_grad(options)
    extra_grads = bool(undifferentiated) or any(
        tensor is not None and tensor.requires_grad for tensor in (target, options.weight)
    )
    chosen = choose_cross_entropy(impl, logits, inplace_backward=inplace_backward, extra_grads=extra_grads)
    if chosen != "reference" and undifferentiated:
        raise ValueError(
            f"impl={chosen!r} does not differentiate {', '.join(undifferentiated)}, which requires grad; "
            "use impl='reference' (or detach it)"
        )
    return chosen


def dispatch_cross_entropy(
    impl: str | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    options: RowLoss,
    reduction: str,
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """The reduced loss of canonical tensors, described by ``options``, by the chosen implementation."""
    chosen = choose_softmax_loss(impl, logits, target, options, inplace_backward=inplace_backward)
    if chosen == "reference":
        return reference_cross_entropy(logits, target, options, reduction)
    kernel = _triton_kernel(logits.device) if chosen == "triton" else None
    return chunked.chunked_cross_entropy(
        logits, target, options, reduction, inplace_backward=inplace_backward, kernel=kernel
    )


def dispatch_linear_cross_entropy(
    impl: str | None,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    options: RowLoss,
    reduction: str,
    *,
    chunk_size: int | None = None,
    weight_grad_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The reduced linear loss of canonical tensors (``input (N, D)``), described by ``options``, by the chosen
    implementation (the automatic one is fused, unless a tensor the fused kernels do not differentiate requires
    grad)."""
    _check_impl(impl)
    undifferentiated = _requiring_grad(options)
    if undifferentiated and impl is None:
        impl = "reference"
    elif undifferentiated and impl != "reference":
        raise ValueError(
            f"impl={impl!r} does not differentiate {', '.join(undifferentiated)}, which requires grad; "
            "use impl='reference' (or detach it)"
        )
    if impl == "reference":
        return reference_linear_cross_entropy(input, linear_weight, linear_bias, target, options, reduction)
    impl = impl or fused_impl(input.device)
    kernel = _triton_kernel(input.device) if impl == "triton" else None
    return chunked_linear.chunked_linear_cross_entropy(
        input,
        linear_weight,
        linear_bias,
        target,
        options,
        reduction,
        chunk_size,
        kernel=kernel,
        weight_grad_dtype=weight_grad_dtype,
    )
