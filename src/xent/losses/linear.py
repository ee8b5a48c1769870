"""Linear cross-entropy: the loss of a linear classification head, computed without its logits."""

from __future__ import annotations

import torch

from xent.core.autocast import autocast_off, cast_for_linear, result_dtype
from xent.core.rowloss import SoftmaxOptions
from xent.kernels.dispatch import dispatch_linear_cross_entropy
from xent.losses import _checks
from xent.losses.softmax import check_softmax_options, checked_options


def canonicalize_linear(
    input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """Check the head's tensors; ``input (..., D)`` → ``(N, D)``, ``target (...)`` → ``(N,)`` (or probabilities
    ``(..., V)`` → ``(N, V)``). Returns them and the batch shape ``(...)``."""
    input = _checks.check_floating("input", input)
    linear_weight = _checks.check_floating("linear_weight", linear_weight)
    target = _checks.check_tensor("target", target)
    if input.dim() == 0:
        raise ValueError("input must have shape (..., D) with D features, got shape ()")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"linear_weight has shape {_checks.shape_str(linear_weight.shape)} but input has shape "
            f"{_checks.shape_str(input.shape)}; expected (V, {input.shape[-1]})"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight has dtype {linear_weight.dtype} but input has dtype {input.dtype}")
    vocab = linear_weight.shape[0]
    if vocab == 0:
        raise ValueError("linear_weight has shape (0, D): there must be at least one class")
    if linear_bias is not None:
        linear_bias = _checks.check_floating("linear_bias", linear_bias)
        if linear_bias.shape != (vocab,):
            raise ValueError(
                f"linear_bias must have shape ({vocab},), got shape {_checks.shape_str(linear_bias.shape)}"
            )
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias has dtype {linear_bias.dtype} but input has dtype {input.dtype}")
    batch_shape = input.shape[:-1]
    flat_input = input.reshape(-1, input.shape[-1])
    probs_shape = torch.Size((*batch_shape, vocab))
    if _checks.is_probability_target(target, input_shape=input.shape, batch_shape=batch_shape, probs_shape=probs_shape):
        return flat_input, target.reshape(-1, vocab), batch_shape
    return flat_input, target.reshape(-1), batch_shape


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    weight_grad_dtype: torch.dtype | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of a linear head, :math:`\operatorname{cross\_entropy}(x W^\top + b,\ y)`, without the logits.

    For a language model's head (N tokens, hidden size D, vocabulary V) the logits are an ``N × V`` tensor — 8 GB in
    float32 for 8,192 tokens and a 256k vocabulary — and eager PyTorch keeps several. Here tokens are processed in
    chunks: a chunk's logits, its loss and gradient, then its share of ``d(input)``, ``d(linear_weight)`` and
    ``d(linear_bias)``; the only extra memory is one chunk of logits (:mod:`xent.kernels.linear`). Each chunk's
    weight gradient is summed over its tokens in float32 inside one GEMM and added to ``d(linear_weight)`` in the
    weight's dtype: a bfloat16 head's gradient is rounded once per chunk (8 times for 8,192 tokens on a GPU), not
    once — ``weight_grad_dtype=torch.float32`` sums in float32 instead, at the price of a float32 copy of the
    weight's gradient. The bias gradient is summed in float32; the result is deterministic (no atomics).

    Every option of :func:`xent.cross_entropy` is supported with the same semantics (weighted mean, 0 when every
    target is ignored, ``z_loss``, ``softcap``). Argument names follow PyTorch 2.13's
    ``torch.nn.functional.linear_cross_entropy``; unlike it, the class dimension is always the last dimension of
    the logits, so ``input`` of shape ``(..., D)`` goes with ``target`` of shape ``(...)``, like a language-model
    head on ``(batch, sequence, D)`` hidden states.

    The gradient is formed during the forward pass for ``"mean"`` and ``"sum"`` and can be backpropagated once;
    ``"none"`` recomputes the logits in backward so that each token's ``grad_output`` scales its own gradient.
    Probability targets and class weights that require grad are differentiated too: their gradients are recomputed
    by the reference in backward (which forms the logits). Second-order gradients need ``impl="reference"``.

    Under ``torch.autocast`` it does what ``F.linear`` followed by ``F.cross_entropy`` does: the head's products in
    the autocast dtype (the input, weight and bias are cast, and their gradients return in their own dtypes), the
    loss in float32.

    Args:
        input: hidden states ``(..., D)``.
        linear_weight: the head's weight ``(V, D)``, same dtype.
        target: class indices ``(...)`` in ``[0, V)`` or ``ignore_index``; or probabilities ``(..., V)``.
        linear_bias: the head's bias ``(V,)`` or ``None``.
        weight, ignore_index, reduction, label_smoothing, z_loss, softcap: as in :func:`xent.cross_entropy`.
        chunk_size: tokens per chunk; by default chosen from N, V and the device (a 128 MB float32 logits chunk on
            the CPU; 1,024 tokens on CUDA, fewer if that would take over an eighth of the free memory). Smaller
            chunks use less memory and, on GPUs below ~512 tokens, more time.
        weight_grad_dtype: the dtype ``d(linear_weight)`` is summed in over chunks: ``None`` (the weight's own
            dtype, no extra memory) or a wider floating dtype such as ``torch.float32``.
        impl: ``None`` picks the fused implementation for the device — ``"triton"`` (the chunked GEMMs with the
            Triton kernel) on CUDA when triton is installed, ``"chunked"`` otherwise; ``"reference"`` is the plain
            ``cross_entropy(linear(input, W, b), target)``.

    Returns:
        The loss: ``()`` or, for ``"none"``, the batch shape ``(...)``; in the input's dtype.

    Example:
        >>> hidden = torch.randn(4, 128, 512, requires_grad=True)             # (batch, sequence, D)
        >>> head = torch.randn(32000, 512, requires_grad=True)                # (V, D)
        >>> tokens = torch.randint(32000, (4, 128))
        >>> xent.linear_cross_entropy(hidden, head, tokens, z_loss=1e-4).backward()
    """
    label_smoothing, z_loss, softcap = check_softmax_options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, ignore_index=ignore_index
    )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if weight_grad_dtype is not None and not isinstance(weight_grad_dtype, torch.dtype):
        raise TypeError(f"weight_grad_dtype must be a torch.dtype or None, got {weight_grad_dtype!r}")
    if weight_grad_dtype is not None and not weight_grad_dtype.is_floating_point:
        raise ValueError(f"weight_grad_dtype must be a floating-point dtype, got {weight_grad_dtype}")
    out_dtype = result_dtype(_checks.check_floating("input", input))
    # Under autocast the head runs as F.linear would, in the autocast dtype, and the loss in float32.
    input, linear_weight, linear_bias = map(cast_for_linear, (input, linear_weight, linear_bias))
    flat_input, flat_target, batch_shape = canonicalize_linear(input, linear_weight, linear_bias, target)
    options = SoftmaxOptions(None, ignore_index, label_smoothing, z_loss, softcap)
    options = checked_options(options, weight, flat_target, linear_weight.shape[0])
    with autocast_off(input):
        loss = dispatch_linear_cross_entropy(
            impl,
            flat_input,
            linear_weight,
            linear_bias,
            flat_target,
            options,
            reduction,
            chunk_size=chunk_size,
            weight_grad_dtype=weight_grad_dtype,
        )
    return (loss.view(batch_shape) if reduction == "none" else loss).to(out_dtype)
