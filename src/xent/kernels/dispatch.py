"""Choose the implementation of a loss from the device, the problem and the options (``impl=`` overrides), once,
and run it from one table keyed by (operation, implementation).

Every implementation takes canonical tensors — logits ``(M, C)`` (operation ``"logits"``) or a linear head's
``input (N, D)`` and weights (operation ``"linear"``), class indices ``(M,)`` or probabilities ``(M, C)`` — and
returns the reduced loss (``(M,)`` for ``reduction="none"``); validation happened before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from xent.core.reference import reference_linear_loss, reference_loss
from xent.core.rowloss import RowLoss, TargetTerm, mean_denominator
from xent.kernels import chunked, ops
from xent.kernels.triton import triton_installed

Impl = Literal["reference", "chunked", "triton"]
IMPLS: tuple[Impl, ...] = get_args(Impl)
# What the automatic choice may run: an implementation, or PyTorch's own cross-entropy (see `pytorch_agrees`).
Chosen = Literal["reference", "chunked", "triton", "pytorch"]
Operation = Literal["logits", "linear"]

# Below this many logits the reference is as fast and keeps double backward; above it the fused kernel wins on time
# and memory (0.96× the reference's time at 51k logits, 0.60× at 256k, 0.2× from 1M, on the CPU).
CHUNKED_MIN_ELEMENTS = 1 << 16
# Up to this many logits a plain cross-entropy on the CPU is PyTorch's own where that is exactly xent's: there a call
# is mostly per-operation overhead, F.cross_entropy is two operations forward and two backward where the general
# definition is a dozen and the fused kernel's custom operator a few hundred microseconds of dispatch. On the 2-core
# CI machine, forward + backward against F.cross_entropy (medians of 550 interleaved calls): the reference 6.7× on
# 16 × 1024 logits (295 against 44 µs); the fused kernel 6.1× there, 4.9× on 64 × 1024, 2.0× on 256 × 1024 and 0.66×
# on 480 × 1024, where PyTorch's three logits-sized buffers no longer stay in cache; this path 2.3×, 2.1× and 1.4×
# (xent's argument and value checks, ~0.1 ms).
PYTORCH_MAX_ELEMENTS = 1 << 18


def check_impl(impl: object) -> Impl | None:
    if impl is not None and impl not in IMPLS:
        names = ", ".join(repr(name) for name in (None, *IMPLS))
        raise ValueError(f"impl must be one of {names}, got {impl!r}")
    return impl  # one of IMPLS or None, checked above


def fused_impl(device: torch.device) -> Impl:
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
    from xent.kernels.triton import row_loss

    return row_loss.loss_and_grad_


def row_kernel(impl: Impl | None, device: torch.device) -> chunked.RowKernel:
    """The row kernel of a fused implementation (``None``: the device's)."""
    impl = check_impl(impl)
    if impl == "reference":
        raise ValueError("impl='reference' has no row kernel")
    impl = impl or fused_impl(device)
    return _triton_kernel(device) if impl == "triton" else chunked.loss_and_grad_


# Tensors of a description that the fused kernels do not differentiate (class weights and targets they do).
UNDIFFERENTIATED = ("alpha", "token_weight", "class_offset", "target_margin")


def _requiring_grad(options: RowLoss) -> list[str]:
    if not torch.is_grad_enabled():
        return []
    return [name for name in UNDIFFERENTIATED if (value := getattr(options, name)) is not None and value.requires_grad]


def plain_cross_entropy(logits: torch.Tensor, target: torch.Tensor, options: RowLoss) -> bool:
    """Whether a call is a plain cross-entropy on the CPU, of a kind ``F.cross_entropy`` computes: class indices,
    class weights, label smoothing and ``ignore_index`` at most, float32 or float64, a class weight that is not
    differentiated (PyTorch refuses to) — and a call that may read values on the host: not while ``torch.compile``,
    ``torch.jit.trace`` or a ``torch.func`` transform (vmap, grad) traces it. Whether PyTorch's result is exactly
    xent's then depends on the values (:func:`pytorch_agrees`)."""
    weight = options.weight
    return not (
        logits.device.type != "cpu"
        or logits.dtype not in (torch.float32, torch.float64)
        or target.is_floating_point()
        or torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None  # torch.jit.trace
        or torch._C._functorch.peek_interpreter_stack() is not None
        or type(options.term) is not TargetTerm
        or options.z_loss
        or options.softcap is not None
        or options.logit_scale != 1.0
        or any(value is not None for value in (options.alpha, options.token_weight, options.class_offset))
        or options.target_margin is not None
        or (weight is not None and (weight.dtype != logits.dtype or (weight.requires_grad and torch.is_grad_enabled())))
    )


def pytorch_agrees(logits: torch.Tensor, target: torch.Tensor, options: RowLoss, reduction: str) -> bool:
    """For a :func:`plain_cross_entropy` call: whether ``F.cross_entropy`` gives exactly xent's loss and gradients on
    these values — none of the cases where xent deliberately differs (docs: differences): every target ignored, a
    non-finite ignored row, a weighted mean over zero weight, a non-finite class weight (PyTorch's gradient of an
    ignored row is then 0 · inf). Host reads of the target, the ignored rows and the weight: free on the CPU."""
    if options.weight is not None and not bool(options.weight.isfinite().all()):
        return False
    ignored = target == options.ignore_index
    if bool(ignored.all()):  # nothing kept (or no target at all): xent's 0, PyTorch's NaN
        return False
    if bool(ignored.any()) and not bool(logits[ignored].isfinite().all()):  # a NaN row: absent for xent only
        return False
    # a weighted mean over zero weight: xent's 0, PyTorch's NaN
    return options.weight is None or reduction != "mean" or bool(mean_denominator(target, options, logits.dtype) > 0)


def choose(
    operation: Operation,
    impl: object,
    input: torch.Tensor,
    target: torch.Tensor,
    options: RowLoss,
    *,
    inplace_backward: bool = False,
    reduction: str = "mean",
) -> Chosen:
    """The implementation that runs a description: ``impl`` checked against what each one supports, or the
    automatic choice — fused for a linear head; for a plain cross-entropy on the CPU of up to
    :data:`PYTORCH_MAX_ELEMENTS` logits PyTorch's own where it is exactly xent's (:func:`plain_cross_entropy`,
    :func:`pytorch_agrees`) and the reference elsewhere; for other logits fused from
    :data:`CHUNKED_MIN_ELEMENTS` (in evaluation too: the reference's materialised log-softmax is slower, 2.5–3×
    PyTorch's time on a busy 2-core machine, ``benchmarks/contention.py``) and the reference below; and the
    reference whenever a tensor the fused kernels do not differentiate requires grad (a target or class weight too,
    for logits — the fused kernels would recompute the reference for them in backward — and for a linear head under
    ``torch.compile``, whose traced backward cannot).
    ``input``: the logits, or the linear head's input; ``reduction``: the call's, for :func:`pytorch_agrees`."""
    impl = check_impl(impl)
    if impl == "reference" and inplace_backward:
        raise ValueError(
            "inplace_backward=True needs a fused kernel (impl 'chunked', 'triton' or None), got 'reference'"
        )
    undifferentiated = _requiring_grad(options)
    if impl is not None and impl != "reference" and undifferentiated:
        raise ValueError(
            f"impl={impl!r} does not differentiate {', '.join(undifferentiated)}, which requires grad; "
            "use impl='reference' (or detach it)"
        )
    fused_grads = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (target, options.weight)
    )
    if impl not in (None, "reference") and fused_grads and torch.compiler.is_compiling():
        raise ValueError(
            f"impl={impl!r} under torch.compile cannot differentiate a target or class weight that requires grad "
            "(its backward recomputes the reference, which a traced backward cannot); leave impl=None or pass "
            "impl='reference'"
        )
    if impl is not None:
        return impl
    if undifferentiated:
        return "reference"
    fused = fused_impl(input.device)
    if inplace_backward:
        return fused
    if operation == "linear":
        # compiled, the fused backward cannot recompute the reference for a target's or a class weight's gradient
        return "reference" if fused_grads and torch.compiler.is_compiling() else fused
    if input.numel() <= PYTORCH_MAX_ELEMENTS and plain_cross_entropy(input, target, options):
        # PyTorch's own, else xent's definition — never the fused kernel here, so that whether a second-order
        # gradient works does not depend on the values of a batch
        return "pytorch" if pytorch_agrees(input, target, options, reduction) else "reference"
    return fused if not fused_grads and input.numel() >= CHUNKED_MIN_ELEMENTS else "reference"


def _logits_reference(
    logits: torch.Tensor, target: torch.Tensor, options: RowLoss, reduction: str, **_: Any
) -> torch.Tensor:
    return reference_loss(logits, target, options, reduction)


def _logits_pytorch(
    logits: torch.Tensor, target: torch.Tensor, options: RowLoss, reduction: str, **_: Any
) -> torch.Tensor:
    return F.cross_entropy(
        logits, target.long(), weight=options.weight, ignore_index=options.ignore_index, reduction=reduction,
        label_smoothing=options.label_smoothing,
    )  # fmt: skip


def _logits_fused(impl: Impl) -> Callable[..., torch.Tensor]:
    def run(
        logits: torch.Tensor, target: torch.Tensor, options: RowLoss, reduction: str, *, inplace_backward: bool
    ) -> torch.Tensor:
        kernel = _triton_kernel(logits.device) if impl == "triton" else None
        if inplace_backward:  # the gradient in the logits' storage: an eager-only autograd Function (see choose)
            return chunked.inplace_row_loss(logits, target, options, reduction, kernel=kernel)
        return ops.fused_row_loss(logits, target, options, reduction, impl)

    return run


def _linear_reference(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    options: RowLoss,
    reduction: str,
    **_: Any,
) -> torch.Tensor:
    return reference_linear_loss(input, linear_weight, linear_bias, target, options, reduction)


def _linear_fused(impl: Impl) -> Callable[..., torch.Tensor]:
    def run(
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        linear_bias: torch.Tensor | None,
        target: torch.Tensor,
        options: RowLoss,
        reduction: str,
        *,
        chunk_size: int | None,
        weight_grad_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        if impl == "triton":
            _triton_kernel(input.device)  # refused here when it cannot run
        return ops.fused_linear_row_loss(
            input, linear_weight, linear_bias, target, options, reduction, impl,
            chunk_size=chunk_size, weight_grad_dtype=weight_grad_dtype,
        )  # fmt: skip

    return run


# (operation, implementation) → the function that runs it on canonical tensors.
IMPLEMENTATIONS: dict[tuple[Operation, Chosen], Callable[..., torch.Tensor]] = {
    ("logits", "reference"): _logits_reference,
    ("logits", "pytorch"): _logits_pytorch,
    ("logits", "chunked"): _logits_fused("chunked"),
    ("logits", "triton"): _logits_fused("triton"),
    ("linear", "reference"): _linear_reference,
    ("linear", "chunked"): _linear_fused("chunked"),
    ("linear", "triton"): _linear_fused("triton"),
}


def dispatch_logits_loss(
    impl: object,
    logits: torch.Tensor,
    target: torch.Tensor,
    options: RowLoss,
    reduction: str,
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """The reduced loss of canonical logits, described by ``options``, by the chosen implementation."""
    chosen = choose("logits", impl, logits, target, options, inplace_backward=inplace_backward, reduction=reduction)
    return IMPLEMENTATIONS["logits", chosen](logits, target, options, reduction, inplace_backward=inplace_backward)


def dispatch_linear_loss(
    impl: object,
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
    implementation."""
    chosen = choose("linear", impl, input, target, options)
    return IMPLEMENTATIONS["linear", chosen](
        input, linear_weight, linear_bias, target, options, reduction,
        chunk_size=chunk_size, weight_grad_dtype=weight_grad_dtype,
    )  # fmt: skip
