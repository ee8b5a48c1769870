r"""Policy and preference losses from hidden states and a linear head, in one call, without the logits: the
per-token log-probabilities and entropies of :func:`xent.linear_log_probs` (chunked over tokens, never ``T × V`` for
any sequence) fed to :func:`xent.policy_loss`, or summed per sequence for :func:`xent.preference_loss`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from xent.losses import checks
from xent.losses.logprobs import linear_log_probs, linear_token_outputs
from xent.losses.policy import PolicyLoss, policy_loss

__all__ = ["SequenceLogProbs", "linear_policy_loss", "linear_sequence_log_probs"]


def _masked_tokens(completion_ids: torch.Tensor, mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The completion's token ids with ``ignore_index`` at padding (their ids, perhaps a pad id outside the
    vocabulary, are never read)."""
    completion_ids = checks.check_tensor("completion_ids", completion_ids)
    mask = checks.check_tensor("mask", mask)
    if completion_ids.shape != mask.shape:
        raise ValueError(
            f"completion_ids has shape {checks.shape_str(completion_ids.shape)} but mask has shape "
            f"{checks.shape_str(mask.shape)}; they must be equal (B, T)"
        )
    if completion_ids.is_floating_point() or completion_ids.dtype == torch.bool:
        raise TypeError(f"completion_ids must hold integer token ids, got dtype {completion_ids.dtype}")
    return torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, ignore_index))


def linear_policy_loss(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    **policy_options: Any,
) -> PolicyLoss:
    r""":func:`xent.policy_loss` of sampled completions, from the hidden states that predict their tokens and the
    output head, without the ``B × T × V`` logits.

    Equal in value, metrics and gradients (of ``input``, ``linear_weight``, ``linear_bias``) to

    .. code-block:: python

        logits = F.linear(input, linear_weight, linear_bias).float() / temperature
        log_probs = logits.log_softmax(-1).gather(-1, completion_ids[..., None])[..., 0]
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        xent.policy_loss(log_probs * mask, advantages, mask, entropy=entropy, **policy_options)

    but the log-probabilities and entropies come from :func:`xent.linear_log_probs`, chunk by chunk: the only
    extra memory is one chunk of logits, and the backward pass recomputes each chunk's logits once (4 GEMMs against
    cross-entropy's 3). The entropy is always passed (TRL's entropy metric; it is differentiated only when the loss
    reads it: an ``entropy_coef`` or a ``top_entropy_quantile``).

    Args:
        input: hidden states ``(B, T, D)``, position ``t`` predicting ``completion_ids[:, t]`` (the model's last
            hidden states, shifted as its logits would be).
        linear_weight: the output head ``(V, D)``.
        completion_ids: the sampled tokens ``(B, T)``; read only where ``mask`` is nonzero.
        advantages: ``(B,)`` or ``(B, T)``, as :func:`xent.policy_loss` takes them.
        mask: ``(B, T)``, 1 for the completion's tokens, 0 for padding.
        linear_bias: ``(V,)`` or ``None``.
        temperature: the sampling temperature the logits are divided by (TRL's ``temperature``).
        chunk_size: tokens per chunk, as in :func:`xent.linear_cross_entropy`.
        **policy_options: the other options of :func:`xent.policy_loss` (``old_log_probs``, ``ref_log_probs``,
            ``loss_type``, ``beta``, ``epsilon``, ``entropy_coef``, ``num_items_in_batch``, ...).

    Example:
        >>> hidden = torch.randn(4, 32, 64, requires_grad=True)
        >>> head = torch.randn(1000, 64, requires_grad=True)
        >>> tokens, mask = torch.randint(1000, (4, 32)), torch.ones(4, 32)
        >>> out = xent.linear_policy_loss(hidden, head, tokens, torch.randn(4), mask, entropy_coef=1e-3)
        >>> out.loss.backward()
    """
    if "log_probs" in policy_options or "entropy" in policy_options:
        raise TypeError(
            "linear_policy_loss computes log_probs and entropy from input and linear_weight; pass neither "
            "(xent.policy_loss takes them precomputed)"
        )
    target = _masked_tokens(completion_ids, mask, -100)
    log_probs, entropy = linear_log_probs(
        input, linear_weight, target, linear_bias=linear_bias, temperature=temperature, chunk_size=chunk_size
    )
    return policy_loss(log_probs, advantages, mask, entropy=entropy, **policy_options)


class SequenceLogProbs(NamedTuple):
    """What :func:`linear_sequence_log_probs` returns."""

    sum: torch.Tensor
    """``(B,)``: each sequence's summed log-probability of its kept tokens (float32; differentiable)."""
    length: torch.Tensor
    """``(B,)``: how many tokens each sum holds (int64), for the losses that average (IPO, SimPO, ORPO)."""


def linear_sequence_log_probs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> SequenceLogProbs:
    r"""Per-sequence log-probabilities of completions under a linear head, without the logits: the inputs of
    :func:`xent.preference_loss` (``chosen_log_probs``, ``chosen_lengths``, ...) from hidden states.

    ``sum[b] = Σ_t log softmax(x_{b,t} Wᵀ + b)[y_{b,t}]`` over the tokens whose target is not ``ignore_index`` (the
    prompt and padding), by :func:`xent.linear_log_probs`: chunked over tokens, one chunk of logits at a time —
    never ``T × V`` for any sequence, where preference trainers that chunk over the batch still build each
    sequence's whole logits.

    Args:
        input: hidden states ``(B, T, D)``, position ``t`` predicting ``target[:, t]``.
        linear_weight: the output head ``(V, D)``.
        target: ``(B, T)`` token ids, ``ignore_index`` where no log-probability counts.
        linear_bias: ``(V,)`` or ``None``.
        ignore_index: the target of tokens to leave out.
        temperature: divides the logits (1 for preference losses).
        chunk_size: tokens per chunk, as in :func:`xent.linear_cross_entropy`.

    Example:
        >>> hidden, head = torch.randn(2, 16, 64, requires_grad=True), torch.randn(500, 64)
        >>> labels = torch.randint(500, (2, 16)); labels[:, :5] = -100          # the prompt
        >>> chosen = xent.linear_sequence_log_probs(hidden, head, labels)
        >>> chosen.sum.shape, chosen.length.tolist()
        (torch.Size([2]), [11, 11])
    """
    target = checks.check_tensor("target", target)
    if target.dim() != 2:
        raise ValueError(f"target must be (B, T) token ids, got shape {checks.shape_str(target.shape)}")
    log_probs = linear_token_outputs(  # no entropy: one pass less over each block of logits
        input,
        linear_weight,
        target,
        linear_bias=linear_bias,
        temperature=temperature,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        outputs=("log_probs",),
    ).log_probs
    return SequenceLogProbs(log_probs.sum(dim=-1), (target != ignore_index).sum(dim=-1))
