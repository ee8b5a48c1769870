"""The plain computation of any row-loss description (:mod:`xent.core.rowloss`), by autograd on a materialised
log-softmax: what ``impl="reference"`` of :func:`xent.cross_entropy` runs, and what the fused kernels fall back to
for the gradients they do not form themselves (probability targets, class weights)."""

from __future__ import annotations

from typing import cast

import torch

from xent.core import rows
from xent.core.reduce import accumulation_dtype, reduce_loss
from xent.core.rowloss import RowLoss, mean_denominator


def transformed_logits(logits: torch.Tensor, target: torch.Tensor | None, options: RowLoss) -> torch.Tensor:
    """:math:`z = s (\\operatorname{cap}(x) + o - m_y e_y)` in the accumulation dtype by
    :func:`xent.core.rows.transform`, differentiable; ``target`` (canonical class indices, ignored ones replaced by
    any valid class) is needed only for a margin."""
    x = logits.to(accumulation_dtype(logits.dtype))
    target_column = margin = None
    if options.target_margin is not None:
        target_column = cast(torch.Tensor, target).unsqueeze(-1)  # a margin comes with class-index targets only
        margin = options.target_margin.to(device=x.device, dtype=x.dtype)[target_column]  # (M, 1)
    z, _ = rows.transform(x, options, target_column=target_column, margin=margin)
    return z


def reference_rows(logits: torch.Tensor, target: torch.Tensor, options: RowLoss) -> torch.Tensor:
    """The reference: one loss per row of canonical logits, in the accumulation dtype.

    Args:
        logits: ``(M, C)``, any floating dtype; half precision is computed in float32.
        target: ``(M,)`` class indices or ``(M, C)`` probabilities.
        options: the description of the loss.

    Returns:
        ``(M,)`` losses, already multiplied by the target's class weight and the token weight; ignored rows are 0.
    """
    num_classes = logits.shape[-1]
    smoothing = options.label_smoothing
    soft = target.is_floating_point()
    valid = None if soft else target != options.ignore_index
    safe_target = None if valid is None else torch.where(valid, target, torch.zeros_like(target))
    x = logits.to(accumulation_dtype(logits.dtype))
    if valid is not None:
        # An ignored row is absent whatever it holds (-inf of a masked class at its placeholder target, NaN, ±inf):
        # replaced by zeros before the transform, its loss and its gradient are 0 and cannot turn NaN (masked after
        # the soft cap, the gradient would be 0 · (1 - tanh²(NaN)) = NaN).
        x = torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    x = transformed_logits(x, safe_target, options)
    lse = torch.logsumexp(x, dim=-1)  # (M,)
    log_probs = x - lse.unsqueeze(-1)  # (M, C)
    weight = None if options.weight is None else options.weight.to(device=x.device, dtype=x.dtype)
    weighted_log_probs = log_probs if weight is None else log_probs * weight
    token_weight = None if options.token_weight is None else options.token_weight.to(x.dtype)

    if soft:
        probs = target.to(x.dtype)
        if smoothing:
            probs = probs * (1.0 - smoothing) + smoothing / num_classes
        loss = -(probs * weighted_log_probs).sum(-1)
        if options.z_loss:
            loss = loss + options.z_loss * lse.square()
        return loss if token_weight is None else loss * token_weight

    # class indices from here on, so valid and safe_target are set
    valid, safe_target = cast(torch.Tensor, valid), cast(torch.Tensor, safe_target)
    u = log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)  # log p_y
    target_weight = torch.ones_like(u) if weight is None else weight[safe_target]
    main = options.term.value(u, smoothing, num_classes)
    if options.alpha is not None:
        main = main * options.alpha.to(device=x.device, dtype=x.dtype)[safe_target]
    loss = target_weight * main
    if smoothing:
        # PyTorch's convention: the uniform part is weighted class by class, not by the target's weight.
        loss = loss - (smoothing / num_classes) * weighted_log_probs.sum(-1)
    if options.z_loss:
        loss = loss + options.z_loss * target_weight * lse.square()
    if token_weight is not None:
        loss = loss * token_weight
    return torch.where(valid, loss, torch.zeros_like(loss))


def reference_loss(logits: torch.Tensor, target: torch.Tensor, options: RowLoss, reduction: str) -> torch.Tensor:
    """The reference implementation on canonical tensors: :func:`reference_rows`, then the reduction."""
    rows = reference_rows(logits, target, options)
    denominator = mean_denominator(target, options, rows.dtype) if reduction == "mean" else None
    return reduce_loss(rows, reduction, denominator)


def without_ignored_rows(input: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``input (N, D)`` with the rows of ignored class-index targets read as zeros (probabilities: unchanged).

    An ignored token is absent whatever its hidden state holds; through the head's GEMM a NaN there would reach the
    weight's gradient as ``0 · NaN``, although the row's gradient is 0.
    """
    if target.is_floating_point():
        return input
    kept = (target != ignore_index).unsqueeze(-1)
    return torch.where(kept, input, torch.zeros((), dtype=input.dtype, device=input.device))


def reference_linear_loss(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    options: RowLoss,
    reduction: str,
) -> torch.Tensor:
    """The reference on canonical tensors (``input (N, D)``): the logits in full (ignored tokens' hidden states read
    as zeros, :func:`without_ignored_rows`), then the reference loss."""
    input = without_ignored_rows(input, target, options.ignore_index)
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    return reference_loss(logits, target, options, reduction)
