"""Losses of a linear head computed without its logits: :func:`linear_loss` for every fused loss of the family,
:func:`linear_cross_entropy` for cross-entropy."""

from __future__ import annotations

from collections.abc import Callable

import torch

from xent._config import values_checked
from xent.core.autocast import autocast_off, cast_for_linear, result_dtype
from xent.core.reference import without_ignored_rows
from xent.kernels.dispatch import Impl, dispatch_linear_loss
from xent.losses import checks
from xent.losses.family import check_fused_call, family_loss
from xent.losses.softmax import check_token_weight, checked_options, cross_entropy

HEAD_NAMES = ("input", "linear_weight", "linear_bias")


def check_head(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    names: tuple[str, str, str] = HEAD_NAMES,
) -> int:
    """Check a linear head's tensors — ``input (..., D)``, ``linear_weight (V, D)``, ``linear_bias (V,)`` or None,
    one floating dtype — and return V; errors call them by the caller's ``names``."""
    input_name, weight_name, bias_name = names
    checks.check_not_sharded(**{input_name: input, weight_name: linear_weight, bias_name: linear_bias})
    input = checks.check_floating(input_name, input)
    linear_weight = checks.check_floating(weight_name, linear_weight)
    if input.dim() == 0:
        raise ValueError(f"{input_name} must have shape (..., D) with D features, got shape ()")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"{weight_name} has shape {checks.shape_str(linear_weight.shape)} but {input_name} has shape "
            f"{checks.shape_str(input.shape)}; expected (V, {input.shape[-1]})"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"{weight_name} has dtype {linear_weight.dtype} but {input_name} has dtype {input.dtype}")
    vocab = linear_weight.shape[0]
    if linear_bias is not None:
        linear_bias = checks.check_floating(bias_name, linear_bias)
        if linear_bias.shape != (vocab,):
            raise ValueError(f"{bias_name} must have shape ({vocab},), got shape {checks.shape_str(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"{bias_name} has dtype {linear_bias.dtype} but {input_name} has dtype {input.dtype}")
    return vocab


def canonicalize_linear(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    names: tuple[str, str, str] = HEAD_NAMES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """Check the head's tensors (:func:`check_head`); ``input (..., D)`` → ``(N, D)``, ``target (...)`` → ``(N,)``
    (or probabilities ``(..., V)`` → ``(N, V)``). Returns them and the batch shape ``(...)``."""
    vocab = check_head(input, linear_weight, linear_bias, names)
    target = checks.check_tensor("target", target)
    if vocab == 0:
        raise ValueError(f"{names[1]} has shape (0, D): there must be at least one class")
    batch_shape = input.shape[:-1]
    flat_input = input.reshape(batch_shape.numel(), input.shape[-1])  # not -1: D may be 0 (the logits are the bias)
    probs_shape = torch.Size((*batch_shape, vocab))
    if checks.is_probability_target(target, input_shape=input.shape, batch_shape=batch_shape, probs_shape=probs_shape):
        return flat_input, target.reshape(-1, vocab), batch_shape
    return flat_input, target.reshape(-1).long(), batch_shape  # any integer dtype is an index


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
    impl: Impl | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of a linear head, :math:`\operatorname{cross\_entropy}(x W^\top + b,\ y)`, without the logits.

    For a language model's head (N tokens, hidden size D, vocabulary V) the logits are an ``N × V`` tensor — 8 GB in
    float32 for 8,192 tokens and a 256k vocabulary — and eager PyTorch keeps several. Here tokens are processed in
    chunks: a chunk's logits, its loss and gradient, then its share of ``d(input)``, ``d(linear_weight)`` and
    ``d(linear_bias)``; the only extra memory is one chunk of logits (``xent.kernels.linear``). Each chunk's
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
    return linear_loss(
        cross_entropy,
        input,
        linear_weight,
        target,
        linear_bias=linear_bias,
        chunk_size=chunk_size,
        weight_grad_dtype=weight_grad_dtype,
        impl=impl,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )


def linear_loss(
    loss: Callable[..., torch.Tensor] | str,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    weight_grad_dtype: torch.dtype | None = None,
    impl: Impl | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weight: torch.Tensor | None = None,
    softcap: float | None = None,
    **loss_options: object,
) -> torch.Tensor:
    r"""Any softmax loss of the family on a linear head, :math:`\operatorname{loss}(x W^\top + b,\ y)`, without the
    logits.

    Equal in value and in the gradients of ``input``, ``linear_weight`` and ``linear_bias`` to
    ``loss(F.linear(input, linear_weight, linear_bias).reshape(-1, V), target.reshape(-1), **loss_options)``
    (``reduction="none"`` reshaped like ``target``), computed chunk by chunk as :func:`linear_cross_entropy` does:
    the ``N × V`` logits are never formed. The loss is described once (its logit transform, its target term
    :math:`\psi(\log p_y)`, its options — ``xent.core.rowloss``) and every chunk runs the fused row kernel on it.

    Args:
        loss: one of :func:`xent.cross_entropy`, :func:`xent.focal_loss`, :func:`xent.poly1_cross_entropy`,
            :func:`xent.generalized_cross_entropy`, :func:`xent.symmetric_cross_entropy`,
            :func:`xent.logit_adjusted_cross_entropy`, :func:`xent.balanced_softmax_cross_entropy`,
            :func:`xent.ldam_loss` — or its name (``"focal_loss"``).
        input: hidden states ``(..., D)``.
        linear_weight: the head's weight ``(V, D)``, same dtype.
        target: class indices ``(...)``; probabilities ``(..., V)`` for ``cross_entropy`` only.
        linear_bias, chunk_size, weight_grad_dtype: as in :func:`xent.linear_cross_entropy`.
        impl: ``None`` (the fused kernels: Triton on CUDA when installed, chunked PyTorch otherwise), ``"chunked"``,
            ``"triton"``, or ``"reference"`` — the loss's own definition on the materialised logits.
        weight, ignore_index, reduction, token_weight: as in the loss.
        softcap: caps the head's logits :math:`z \mapsto c \tanh(z / c)` before the loss (Gemma-2's
            ``final_logit_softcapping``), for every loss: ``cross_entropy``'s own option, and for the others the
            loss of the capped logits.
        **loss_options: the loss's own options (``gamma=2.0``, ``class_counts=counts``, ``label_smoothing=0.1``, …).

    Returns:
        The loss: ``()`` or, for ``"none"``, the batch shape ``(...)``.

    Example:
        >>> hidden, head = torch.randn(4, 128, 512, requires_grad=True), torch.randn(32000, 512, requires_grad=True)
        >>> tokens = torch.randint(32000, (4, 128))
        >>> xent.linear_loss(xent.focal_loss, hidden, head, tokens, gamma=2.0).backward()
    """
    out_dtype = result_dtype(checks.check_floating("input", input))
    return accumulated_linear_loss(
        loss,
        input,
        linear_weight,
        target,
        linear_bias=linear_bias,
        chunk_size=chunk_size,
        weight_grad_dtype=weight_grad_dtype,
        impl=impl,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        token_weight=token_weight,
        softcap=softcap,
        **loss_options,
    ).to(out_dtype)


def accumulated_linear_loss(
    loss: Callable[..., torch.Tensor] | str,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None,
    chunk_size: int | None,
    weight_grad_dtype: torch.dtype | None,
    impl: Impl | None,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    token_weight: torch.Tensor | None,
    softcap: float | None,
    **loss_options: object,
) -> torch.Tensor:
    """:func:`linear_loss` before its result is cast to the input's dtype: float32 (float64 for float64 inputs) from
    the fused implementations, as a loss of upcast logits would be (Hugging Face models compute theirs so)."""
    entry = family_loss(loss)
    checks.check_reduction_and_ignore_index(reduction, ignore_index)
    softcap = check_fused_call(
        entry, loss_options, softcap=softcap, chunk_size=chunk_size, weight_grad_dtype=weight_grad_dtype
    )
    # Under autocast the head runs as F.linear would, in the autocast dtype, and the loss in float32.
    input, linear_weight, linear_bias = (
        cast_for_linear(input),
        cast_for_linear(linear_weight),
        cast_for_linear(linear_bias),
    )
    flat_input, flat_target, batch_shape = canonicalize_linear(input, linear_weight, linear_bias, target)
    if flat_target.is_floating_point() and not entry.takes_probabilities:
        raise TypeError(
            f"{entry.name} takes class indices as target, of shape {checks.shape_str(batch_shape)}, not probabilities"
        )
    vocab = linear_weight.shape[0]
    flat_token_weight = check_token_weight(token_weight, batch_shape)
    description = entry.description(
        vocab, loss_options, softcap=softcap, ignore_index=ignore_index, token_weight=flat_token_weight
    )
    options = checked_options(description, weight, flat_target, vocab)
    with autocast_off(input):
        if impl == "reference":
            logits = torch.nn.functional.linear(
                without_ignored_rows(flat_input, flat_target, ignore_index), linear_weight, linear_bias
            )
            own_options = {**loss_options, "softcap": softcap} if entry.caps_itself else loss_options
            if softcap is not None and not entry.caps_itself:
                logits = softcap * torch.tanh(logits / softcap)
            shared = {"weight": weight, "ignore_index": ignore_index, "reduction": reduction}
            with values_checked():  # the target's values were checked above (checked_options)
                result = entry.function(
                    logits, flat_target, token_weight=flat_token_weight, impl=impl, **shared, **own_options
                )
        else:
            result = dispatch_linear_loss(
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
    return result.view(batch_shape) if reduction == "none" else result
