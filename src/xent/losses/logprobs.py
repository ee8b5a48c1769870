"""Per-token outputs of a linear head without its logits: :func:`linear_log_probs`, the log-probability of each
token's target and the entropy of its distribution, as RL fine-tuning (GRPO, PPO) and evaluation need them, and
:func:`linear_token_outputs`, the same with the statistics trainers log (``log Σ p²``, the mean logit, top-1)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from xent.core.autocast import autocast_off, cast_for_linear
from xent.kernels.logprobs import STATISTICS, HeadTransform
from xent.kernels.ops import fused_linear_log_probs
from xent.losses import checks
from xent.losses.linear import canonicalize_linear
from xent.losses.teachers import check_logit_scale, check_softcap

TOKEN_OUTPUTS = ("log_probs", *STATISTICS)


class TokenOutputs(NamedTuple):
    """Per-token outputs of :func:`linear_token_outputs`, each shaped like the target; those not asked for are None."""

    log_probs: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None
    mean_logits: torch.Tensor | None
    is_top1: torch.Tensor | None


def linear_log_probs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Log-probability of each token's target and entropy of each token's distribution under a linear head,
    without the logits.

    With logits :math:`z = s\,\mathrm{cap}(x W^\top + b) / T` (:math:`s` = ``logit_scale``, :math:`\mathrm{cap}(u) =
    c \tanh(u / c)` with :math:`c` = ``softcap``, the identity without one) and :math:`p = \operatorname{softmax}(z)`,
    each token :math:`n` gets

    .. math::

        \log p_{n, y_n} = z_{n, y_n} - \log \sum_j e^{z_{n j}}, \qquad
        H_n = -\sum_j p_{n j} \log p_{n j},

    the per-token quantities of policy-gradient fine-tuning (the log-probability of the sampled token for GRPO's
    and PPO's ratios, the entropy for a bonus or for monitoring) and of evaluation. Equal in value and gradient to
    ``torch.log_softmax(F.linear(input, linear_weight, linear_bias).float() / temperature, -1)`` gathered at
    ``target`` (with the scale and cap applied before the division), and to the entropy of the same distribution,
    but the ``N × V`` logits are never formed: tokens go in chunks, and the only extra memory is one chunk of logits
    (``xent.kernels.logprobs``). The forward pass keeps one log-sum-exp per token; the backward pass recomputes each
    chunk's logits, because the gradient
    :math:`\partial / \partial z_{n j} = g^{lp}_n (\delta_{j y_n} - p_{n j}) - g^{H}_n\, p_{n j} (\log p_{n j} + H_n)`
    needs both outputs' ``grad_output`` (either may be unused). The softmax runs in float32 (float64 for float64
    inputs), and so are ``d(linear_weight)`` and ``d(linear_bias)`` summed over chunks before they are cast to the
    head's dtype. Second-order gradients are not supported.

    A token whose target is ``ignore_index`` gets log-probability 0, with no gradient through it; its entropy is
    computed as for any other token. A class masked with a ``-inf`` bias gets probability 0 and adds nothing to the
    entropy.

    Under ``torch.autocast`` it does what ``F.linear`` followed by ``log_softmax`` does: the head's products in the
    autocast dtype (the input, weight and bias are cast, and their gradients return in their own dtypes), both
    outputs in float32.

    Args:
        input: hidden states ``(..., D)``.
        linear_weight: the head's weight ``(V, D)``, same dtype.
        target: class indices ``(...)`` in ``[0, V)`` or ``ignore_index``, any integer dtype.
        linear_bias: the head's bias ``(V,)`` or ``None``.
        temperature: :math:`T`, a finite number > 0 dividing the logits (the sampling temperature); default 1.
        logit_scale: :math:`s`, a finite number > 0 multiplying the capped head's output (Cohere's ``logit_scale``,
            Granite's ``1 / logits_scaling``); default 1.
        softcap: :math:`c`, ``None`` or a finite number > 0: the head's output is capped as ``c · tanh(u / c)``
            before the scale (Gemma 2's ``final_logit_softcapping`` is ``c`` with ``s = 1``; a model that caps
            after scaling, ``c' tanh(s u / c')``, is ``softcap = c' / s``).
        ignore_index: the target of tokens to leave out (prompt or padding tokens).
        chunk_size: tokens per chunk, as in :func:`xent.linear_cross_entropy`.

    Returns:
        ``(log_probs, entropy)``, each shaped like ``target``, in float32 (float64 for float64 inputs) whatever the
        head's dtype, as the reference's upcast logits give them: a bfloat16 log-probability (3 significant digits)
        would make PPO's ratio :math:`e^{\log p - \log p_{old}}` noise.

    Example:
        >>> hidden = torch.randn(4, 128, 512, requires_grad=True)             # (batch, sequence, D)
        >>> head = torch.randn(32000, 512, requires_grad=True)                # (V, D)
        >>> tokens = torch.randint(32000, (4, 128))                           # sampled completions
        >>> log_probs, entropy = xent.linear_log_probs(hidden, head, tokens, temperature=0.7)
        >>> advantages = torch.randn(4, 1)
        >>> (-(advantages * log_probs).mean() - 1e-3 * entropy.mean()).backward()
    """
    outputs = _token_outputs(
        input, linear_weight, target, linear_bias, temperature, logit_scale, softcap, ignore_index, chunk_size,
        frozenset({"entropy"}),
    )  # fmt: skip
    return outputs.log_probs, outputs.entropy  # type: ignore[return-value]  # asked for: a tensor


def linear_token_outputs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    outputs: Iterable[str] = ("log_probs", "entropy"),
) -> TokenOutputs:
    r"""The per-token outputs of a linear head that trainers ask for, in one chunked pass without the logits.

    :func:`linear_log_probs` with a choice of what else each token gets besides its target's log-probability (the
    logits :math:`z`, their scale, soft cap and temperature as there):

    - ``"entropy"``: :math:`H_n = -\sum_j p_{nj} \log p_{nj}`, differentiable (an entropy bonus);
    - ``"log_sum_sq_probs"``: :math:`\log \sum_j p_{nj}^2`, the log-probability that two samples agree (WPO's
      weights), no gradient;
    - ``"mean_logits"``: :math:`\frac1V \sum_j z_{nj}`, the mean logit trainers log, no gradient;
    - ``"is_top1"``: whether the target is the most likely class (the first of tied maxima, as ``argmax``), bool:
      the token accuracy trainers log.

    Each costs a little of every forward pass and nothing of the backward, which differentiates the
    log-probabilities and the entropy as :func:`linear_log_probs` does. Ignored tokens get log-probability 0 and
    ``is_top1`` False; their other statistics are computed as for any token.

    Args:
        input, linear_weight, target, linear_bias, temperature, logit_scale, softcap, ignore_index, chunk_size:
            as in :func:`linear_log_probs`.
        outputs: the names of the outputs to compute, among ``"log_probs"`` (always computed), ``"entropy"``,
            ``"log_sum_sq_probs"``, ``"mean_logits"`` and ``"is_top1"``; default log-probabilities and entropy.

    Returns:
        :class:`TokenOutputs` ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each shaped like
        ``target`` (float32, float64 for float64 inputs; ``is_top1`` bool), those not asked for None.

    Example:
        >>> hidden, head = torch.randn(2, 16, 64), torch.randn(1000, 64)
        >>> tokens = torch.randint(1000, (2, 16))
        >>> out = xent.linear_token_outputs(hidden, head, tokens, outputs=("log_probs", "mean_logits", "is_top1"))
        >>> out.entropy is None, out.is_top1.dtype, tuple(out.mean_logits.shape)
        (True, torch.bool, (2, 16))
    """
    return _token_outputs(
        input, linear_weight, target, linear_bias, temperature, logit_scale, softcap, ignore_index, chunk_size,
        check_outputs(outputs),
    )  # fmt: skip


def check_outputs(outputs: Iterable[str]) -> frozenset[str]:
    """The statistics asked for besides the log-probabilities (always computed), from ``outputs``' names."""
    if isinstance(outputs, str):
        raise TypeError(f"outputs must be a collection of output names, not the string {outputs!r}")
    try:
        names = list(outputs)
    except TypeError:
        raise TypeError(f"outputs must be a collection of output names, got {checks.shown(outputs)}") from None
    for name in names:
        if not isinstance(name, str) or name not in TOKEN_OUTPUTS:
            raise ValueError(f"outputs has {name!r}; expected names among {', '.join(map(repr, TOKEN_OUTPUTS))}")
    return frozenset(names) - {"log_probs"}


def _token_outputs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    temperature: float,
    logit_scale: float,
    softcap: float | None,
    ignore_index: int,
    chunk_size: int | None,
    statistics: frozenset[str],
) -> TokenOutputs:
    checks.check_chunk_size(chunk_size)
    temperature = checks.check_in_range(
        "temperature", temperature, 0.0, math.inf, low_inclusive=False, high_inclusive=False
    )
    transform = HeadTransform(
        check_logit_scale("logit_scale", logit_scale) / temperature, check_softcap("softcap", softcap)
    )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    checks.check_floating("input", input)
    # Under autocast the head runs as F.linear would, in the autocast dtype, and the softmax in float32.
    input, linear_weight, linear_bias = (
        cast_for_linear(input),
        cast_for_linear(linear_weight),
        cast_for_linear(linear_bias),
    )
    flat_input, flat_target, batch_shape = canonicalize_linear(input, linear_weight, linear_bias, target)
    if flat_target.is_floating_point():
        raise TypeError(
            f"linear_log_probs takes class indices as target, of shape {checks.shape_str(batch_shape)}, "
            "not probabilities"
        )
    checks.check_class_indices(flat_target, linear_weight.shape[0], ignore_index)
    with autocast_off(input):
        rows = fused_linear_log_probs(
            flat_input, linear_weight, linear_bias, flat_target, transform, ignore_index, chunk_size, statistics
        )
    shaped = (None if value is None else value.view(batch_shape) for value in rows[1:])
    return TokenOutputs(rows.log_probs.view(batch_shape), *shaped)
