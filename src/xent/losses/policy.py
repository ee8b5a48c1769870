r"""Policy-gradient objectives on per-token log-probabilities: TRL 1.16's ``GRPOTrainer`` losses (GRPO, BNPO,
Dr. GRPO, DAPO, CISPO, SAPO, LUSPO, VESPO; GSPO as sequence-level importance sampling) and PPO's clipped objective,
as functions of ``(B, T)`` tensors that any training loop can call.

Every definition is TRL 1.16's ``GRPOTrainer._compute_loss`` (``trl/trainer/grpo_trainer.py``), its options named
as ``GRPOConfig`` names them, computed in this order::

    ratio w = exp(log π − log π_old)            per token, or exp(mean over the sequence) at "sequence" level
    ℓ_t     = loss_type's per-token objective   grpo family: −min(w A, clip(w, 1−ε_low, 1+ε_high) A) ...
            × off-policy sequence mask × top-entropy mask × rollout importance ratio
            + β · KL_t                          k3 estimator, × w with use_bias_correction_kl
    loss    = aggregate(ℓ_t · mask) / G − entropy_coef · mean entropy / G

where the aggregation is the loss type's (per-sequence mean, token mean, constant, ...) and G the number of
gradient-accumulation steps TRL divides by inside its trainer.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from xent.core.reduce import accumulation_dtype, safe_divide
from xent.losses import checks

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "POLICY_LOSS_TYPES",
    "ROLLOUT_IMPORTANCE_MODES",
    "PolicyLoss",
    "policy_loss",
    "rollout_importance_ratio",
]

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ROLLOUT_IMPORTANCE_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the PPO-style clip: −min(w A, clip(w) A)
_BY_TOKEN_COUNT = ("dapo", "cispo", "vespo")  # divided by num_items_in_batch


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """What :func:`policy_loss` returns: the loss to differentiate, the per-token loss and the metrics TRL's
    ``GRPOTrainer`` logs. The metrics are detached, in float32 (float64 for float64 inputs), and ``None`` where the
    loss type or the inputs do not define them. Each is the single-process value of TRL's metric of the same name
    (TRL reduces the same sums across processes).

    Attributes:
        loss: the scalar to call ``backward()`` on, in ``log_probs``' dtype: the aggregated policy loss (with
            :math:`\\beta` KL) divided by ``gradient_accumulation_steps``, minus the entropy bonus. Equal to what
            ``GRPOTrainer._compute_loss`` returns (in training mode).
        per_token_loss: ``(B, T)``, in ``log_probs``' dtype: each token's loss after the masks, the rollout
            importance ratio and :math:`\\beta \\cdot` KL, and times ``mask`` (0 at padding), so that the
            aggregation reads off it: ``"bnpo"``'s loss is ``per_token_loss.sum() / mask.sum()``. A sequence-level
            ratio is broadcast over its sequence's tokens.
        policy_loss: TRL's ``policy_loss`` metric: the aggregated policy loss with its KL term, before the division
            by ``gradient_accumulation_steps`` (for ``"dapo"``/``"cispo"``/``"vespo"``, whose normaliser spans the
            accumulation window, the loss of this micro-batch as it is) and without the entropy bonus.
        kl: TRL's ``kl``: the mean over the tokens of ``mask`` of the KL estimate to the reference (bias-corrected
            like the loss's); whenever ``ref_log_probs`` is given, even with ``beta=0``.
        entropy: TRL's ``entropy``: the mean over the tokens of ``mask`` of ``entropy``, when given.
        clip_ratio_low: TRL's ``clip_ratio/low_mean``, for the clipped types (grpo, bnpo, dr_grpo, dapo, luspo): the
            fraction of tokens with :math:`w < 1 - \\epsilon_{low}` and :math:`A < 0` (of sequences, at sequence
            level with ``(B,)`` advantages, empty ones counted, as TRL counts them).
        clip_ratio_high: TRL's ``clip_ratio/high_mean``: :math:`w > 1 + \\epsilon_{high}` and :math:`A > 0` (``w``
            after ``delta``'s cap, as in TRL).
        clip_ratio_region: TRL's ``clip_ratio/region_mean``: either of the two.
        cispo_clip_ratio: TRL's ``cispo_clip_ratio``, for ``"cispo"``: :math:`w > \\epsilon_{high}` and :math:`A > 0`.
        vespo_phi_mean: TRL's ``vespo/phi_seq_mean``, for ``"vespo"``: the mean of the sequences' gamma weights.
    """

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    clip_ratio_low: torch.Tensor | None = None
    clip_ratio_high: torch.Tensor | None = None
    clip_ratio_region: torch.Tensor | None = None
    cispo_clip_ratio: torch.Tensor | None = None
    vespo_phi_mean: torch.Tensor | None = None


def policy_loss(
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    loss_type: str = "grpo",
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: float | None = None,
    sampling_log_probs: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    gradient_accumulation_steps: int = 1,
) -> PolicyLoss:
    r"""Policy-gradient loss of sampled completions from their per-token log-probabilities, as TRL 1.16's
    ``GRPOTrainer`` computes it.

    With the importance ratio :math:`w_{i,t} = \pi_\theta(o_{i,t}) / \pi_{old}(o_{i,t})` (``"token"`` level), or
    :math:`w_i = \exp\bigl(\frac{1}{|o_i|}\sum_t \log \frac{\pi_\theta}{\pi_{old}}\bigr)` for every token of
    sequence :math:`i` (``"sequence"`` level: GSPO), the per-token loss is

    .. math::
        \ell_{i,t} = \begin{cases}
            -\min\bigl(\min(w, \delta) A,\; \operatorname{clip}(w, 1 - \epsilon_{low}, 1 + \epsilon_{high}) A\bigr)
                & \text{grpo, bnpo, dr\_grpo, dapo, luspo} \\
            -\operatorname{sg}[\min(w, \epsilon_{high})]\, A \log \pi_\theta(o_{i,t}) & \text{cispo} \\
            -\frac{4}{\tau} \sigma\bigl(\tau (w - 1)\bigr) A,
                \quad \tau = \tau_{pos} \text{ if } A > 0 \text{ else } \tau_{neg} & \text{sapo} \\
            -\operatorname{sg}[\phi(W_i)]\, A \log \pi_\theta(o_{i,t}),
                \quad \phi(W) = e^{\lambda} W^k e^{-\lambda W} & \text{vespo}
        \end{cases}

    (:math:`\min(w, \delta)` only with ``delta``; VESPO's :math:`W_i = \prod_t w_{i,t}` times the rollout ratios,
    :math:`k, \lambda` by the sign of :math:`A`), then multiplied by the off-policy sequence mask, the top-entropy
    mask and the rollout importance ratio (not for vespo, whose :math:`W` holds it), plus
    :math:`\beta\, \mathrm{KL}_{i,t}` with the k3 estimator
    :math:`\mathrm{KL} = e^{r} - r - 1,\ r = \log \pi_{ref} - \log \pi_\theta` (times :math:`w` with
    ``use_bias_correction_kl``). Over the tokens :math:`m_{i,t} \in \{0, 1\}` of ``mask``, the loss is

    .. math::
        L = \frac{1}{G} \begin{cases}
            \frac{1}{B} \sum_i \frac{\sum_t m \ell}{\max(\sum_t m, 1)} & \text{grpo, sapo} \\
            \sum_{i,t} m \ell / \max(\sum_{i,t} m, 1) & \text{bnpo} \\
            \sum_{i,t} m \ell / (B \cdot \text{max\_completion\_length}) & \text{dr\_grpo} \\
            \frac{1}{B} \sum_i \sum_t m \ell & \text{luspo}
        \end{cases}
        \qquad
        L = \frac{\sum_{i,t} m \ell}{N} \quad \text{dapo, cispo, vespo}

    with :math:`N` = ``num_items_in_batch`` (by default :math:`G \sum m`), and with ``entropy_coef`` the bonus
    :math:`-c\, \bar H / G`, :math:`\bar H` the mean entropy over the masked tokens that the top-entropy mask keeps.

    **Gradient accumulation.** :math:`G` = ``gradient_accumulation_steps``: call ``backward()`` on ``loss`` of each
    micro-batch and the window's gradient is TRL's. For dapo, cispo and vespo pass ``num_items_in_batch`` = the
    masked tokens of the whole window on this process — TRL's ``inputs["num_items_in_batch"] / num_processes *
    gradient_accumulation_steps / steps_per_generation`` (its count spans the generation batch of every process) —
    and the sum over the window is the window's token mean (DAPO's); without it, each micro-batch's own token count
    stands in. In evaluation TRL divides by nothing: pass ``gradient_accumulation_steps=1``.

    **PPO.** PPO's clipped surrogate (Schulman et al. 2017; TRL's ``PPOTrainer``, verl's default ``"token-mean"``)
    is ``loss_type="bnpo"`` with per-token advantages ``(B, T)`` (GAE) and ``old_log_probs``; ``loss_type="dapo"``
    with ``num_items_in_batch`` makes the token mean span the accumulation window.

    **Where TRL, verl and the papers differ** (this follows TRL):

    - *grpo* (Shao et al. 2024, DeepSeekMath): the per-sequence mean, then the mean over sequences, as the paper;
      verl's ``loss_agg_mode="seq-mean-token-mean"`` (verl's default is ``"token-mean"``, which is bnpo). The k3 KL
      is the paper's; verl's ``low_var_kl`` also clamps it to [−10, 10].
    - *dr_grpo* (Liu et al. 2025): the paper divides the sum by a constant; TRL (and this) by
      :math:`B \cdot` ``max_completion_length`` of the micro-batch, verl's ``"seq-mean-token-sum-norm"`` by the
      padded length :math:`T` alone (no :math:`B`). Without ``max_completion_length`` it is refused: a batch's padded
      length would bring back the length dependence the method removes.
    - *dapo* (Yu et al. 2025): the token-level mean over the batch, here and in TRL over the accumulation window
      (``num_items_in_batch``); verl's ``"token-mean"`` over its mini-batch. DAPO's clip-higher is
      ``epsilon_high`` (0.28 in the paper); its dynamic sampling and overlong shaping are data-side, not here.
    - *GSPO* (Zheng et al. 2025) is ``importance_sampling_level="sequence"``: the ratio is the geometric mean of the
      token ratios, :math:`(\pi_\theta(o_i)/\pi_{old}(o_i))^{1/|o_i|}`, clipped with the paper's tiny ranges
      (3e-4, 4e-4); with ``"grpo"`` the sequence losses are averaged over sequences, as the paper. TRL warns that
      bnpo/dr_grpo/dapo/cispo at sequence level weight each sequence by its length; so does this.
    - *cispo* (MiniMax-M1, 2025): the paper clips the detached ratio to :math:`[1 - \epsilon_{low},
      1 + \epsilon_{high}]`; TRL only from above, and at ``epsilon_high`` itself, not :math:`1 + \epsilon_{high}`
      (ScaleRL's :math:`\epsilon_{max}`, recommended 5.0). ``epsilon_high`` defaults to ``epsilon`` (0.2) as in
      TRL, which caps CISPO's weight at 0.2: set it.
    - *sapo* (2025): the soft gate :math:`\frac{4}{\tau}\sigma(\tau(w - 1))`, whose gradient at
      :math:`w = 1` is the unclipped one, in place of the hard clip; :math:`\tau_{neg}` for :math:`A \le 0`.
    - *luspo* (2026): GSPO with each sequence's loss times its length; meant for ``"sequence"`` level (TRL only
      warns at ``"token"``, and so does nothing here).
    - *vespo* (2026): TRL's gamma weight on the sequence ratio :math:`W`, in log space, the log-ratios clamped to
      [−20, 20] and :math:`\log W` to [log 1e-8, 20], :math:`\lambda` clamped at 1e-4 — as TRL; its
      ``importance_sampling_level`` only affects the KL's bias correction.
    - *delta* (INTELLECT-2, 2025): the two-sided clip caps the unclipped ratio at :math:`\delta` for every
      advantage; verl's dual clip (``clip_ratio_c``) bounds the loss of negative advantages only.
    - *use_bias_correction_kl* (DeepSeek-V3.2, 2025): the KL times the (differentiable) ratio :math:`w`, which
      changes the KL's gradient even on-policy. TRL's default ``True``; the GRPO paper's KL is ``False``.
    - *off_policy_mask_threshold* (DeepSeek-V3.2's off-policy sequence masking): a sequence with :math:`A < 0` whose
      mean :math:`\log \pi_{sampling} - \log \pi_\theta` over its tokens exceeds the threshold is dropped.
    - *top_entropy_quantile* (Wang et al. 2025, "Beyond the 80/20 rule"): only the tokens whose entropy is at or
      above the :math:`1 - \rho` quantile of the masked tokens keep their policy loss (not their KL); TRL takes the
      quantile over every process's tokens, this over the call's.

    The masks and the rollout importance ratio carry no gradient; ``log_probs`` and ``entropy`` do. Positions
    where ``mask`` is 0 are read as 0 (ratio 1), whatever they hold, so padding never brings a NaN into the loss or
    a gradient; every division by a count is safe: an all-padding batch gives a loss of 0 with a zero gradient.

    Args:
        log_probs: ``(B, T)`` log-probabilities of the sampled tokens under the policy being trained
            (``xent.linear_log_probs``'s first output), floating.
        advantages: ``(B,)`` one per sequence (GRPO's group-normalised rewards) or ``(B, T)`` per token (PPO's GAE),
            floating; ``(B, 1)`` is read as ``(B,)``.
        mask: ``(B, T)`` 1 for the completion tokens that count, 0 for padding (bool, integer or floating with values
            0 and 1): TRL's ``completion_mask`` (times its ``tool_mask``).
        old_log_probs: ``(B, T)`` log-probabilities under the policy that sampled (before this iteration's updates);
            ``None``: ``log_probs.detach()``, the on-policy case (every ratio 1), as TRL.
        ref_log_probs: ``(B, T)`` log-probabilities under the reference policy; required when ``beta != 0``.
        loss_type: ``"grpo"`` (the default here; ``GRPOConfig``'s is ``"dapo"``), ``"bnpo"``,
            ``"dr_grpo"``, ``"dapo"``, ``"cispo"``, ``"sapo"``, ``"luspo"`` or ``"vespo"``.
        beta: the KL coefficient :math:`\beta \ge 0`.
        epsilon: :math:`\epsilon_{low}`, the lower clip: :math:`w \ge 1 - \epsilon`.
        epsilon_high: :math:`\epsilon_{high}`, the upper clip :math:`w \le 1 + \epsilon_{high}` (cispo: the cap
            itself); ``None``: ``epsilon``.
        delta: the two-sided clip's cap on the unclipped ratio, > 0 (INTELLECT-2 recommends > 1 + ε); clipped types.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        use_bias_correction_kl: multiply the KL by the ratio :math:`w`.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's :math:`\tau` for :math:`A > 0` and :math:`A \le 0`.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's :math:`k, \lambda` for
            :math:`A \ge 0` and :math:`A < 0`.
        top_entropy_quantile: :math:`\rho \in [0, 1]`: the fraction of tokens, highest entropy first, that keep
            their policy loss; 1 keeps all, 0 the highest only. Needs ``entropy``.
        off_policy_mask_threshold: the off-policy sequence mask's threshold :math:`\ge 0`, or ``None`` for none.
        sampling_log_probs: ``(B, T)`` log-probabilities from the engine that sampled (vLLM), read by the off-policy
            mask only (NaN where the engine gave none: that token adds nothing); ``None``: ``old_log_probs``.
        importance_sampling_ratio: the rollout (truncated or masked) importance ratio
            :math:`\pi_{old} / \pi_{sampling}` that corrects for another engine's sampling, ``(B, T)``, ``(B, 1)``
            or ``(B,)``, from :func:`rollout_importance_ratio` (TRL's ``vllm_importance_sampling_correction``);
            vespo needs ``(B, T)`` (TRL's token modes).
        entropy: ``(B, T)`` entropy of each token's distribution (``xent.linear_log_probs``' second output),
            differentiable: for the bonus, the top-entropy mask and the ``entropy`` metric.
        entropy_coef: :math:`c`, the entropy bonus's coefficient (TRL's static control; its adaptive control is
            the trainer's state: pass the coefficient it would apply).
        max_completion_length: dr_grpo's constant (``GRPOConfig``'s, 512 by default); refused by the other types.
        num_items_in_batch: dapo's, cispo's and vespo's denominator (see *Gradient accumulation*): a number
            :math:`\ge 0` or a one-element tensor; refused by the other types, which TRL does not divide by it.
        gradient_accumulation_steps: :math:`G \ge 1`, TRL's ``current_gradient_accumulation_steps``.

    Returns:
        A :class:`PolicyLoss`: ``.loss``, ``.per_token_loss`` and the metrics TRL logs.

    Example:
        >>> hidden = torch.randn(8, 16, 64, requires_grad=True)                # (B, T, D): one group of 8
        >>> head = torch.randn(1000, 64, requires_grad=True)                   # (V, D)
        >>> tokens = torch.randint(1000, (8, 16))                              # the sampled completions
        >>> mask = torch.arange(16) < torch.randint(1, 17, (8, 1))             # (B, T): each one's length
        >>> log_probs, entropy = xent.linear_log_probs(hidden, head, tokens)
        >>> rewards = torch.randn(8)
        >>> advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        >>> result = policy_loss(log_probs, advantages, mask, loss_type="dapo", epsilon_high=0.28,
        ...                      entropy=entropy, entropy_coef=1e-3)
        >>> result.loss.backward()
        >>> result.per_token_loss.shape, result.clip_ratio_region                # on-policy: nothing clipped
        (torch.Size([8, 16]), tensor(0.))

    References:
        Schulman et al. Proximal Policy Optimization Algorithms. 2017. Shao et al. DeepSeekMath (GRPO). 2024.
        Liu et al. Understanding R1-Zero-Like Training: A Critical Perspective (Dr. GRPO). 2025. Yu et al. DAPO.
        2025. Zheng et al. Group Sequence Policy Optimization. 2025. MiniMax. MiniMax-M1 (CISPO). 2025. Soft
        Adaptive Policy Optimization, arXiv:2511.20347. 2025. Prime Intellect. INTELLECT-2. 2025. DeepSeek-AI.
        DeepSeek-V3.2. 2025. Wang et al. Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL for
        LLM Reasoning. 2025. LUSPO, arXiv:2602.05261; VESPO, arXiv:2602.10693. 2026. TRL 1.16,
        ``GRPOTrainer._compute_loss``.
    """
    _check_options(
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        use_bias_correction_kl=use_bias_correction_kl,
        delta=delta,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    beta = checks.check_in_range("beta", beta, 0.0, math.inf, high_inclusive=False)
    epsilon_low = checks.check_in_range("epsilon", epsilon, 0.0, math.inf, high_inclusive=False)
    epsilon_high = (
        epsilon_low
        if epsilon_high is None
        else checks.check_in_range("epsilon_high", epsilon_high, 0.0, math.inf, high_inclusive=False)
    )
    top_entropy_quantile = checks.check_in_range("top_entropy_quantile", top_entropy_quantile, 0.0, 1.0)
    entropy_coef = checks.check_in_range(
        "entropy_coef", entropy_coef, -math.inf, math.inf, low_inclusive=False, high_inclusive=False
    )
    threshold = None
    if off_policy_mask_threshold is not None:
        threshold = checks.check_in_range(
            "off_policy_mask_threshold", off_policy_mask_threshold, 0.0, math.inf, high_inclusive=False
        )

    log_probs = checks.check_floating("log_probs", log_probs)
    if log_probs.dim() != 2:
        raise ValueError(
            f"log_probs must have shape (B, T), one log-probability per completion token, got shape "
            f"{checks.shape_str(log_probs.shape)}"
        )
    shape = log_probs.shape
    batch = shape[0]
    keep = _check_mask(mask, shape)
    advantages = checks.check_floating("advantages", advantages)
    _check_per_sequence_or_token("advantages", advantages, shape)
    old = _check_token_tensor("old_log_probs", old_log_probs, shape)
    ref = _check_token_tensor("ref_log_probs", ref_log_probs, shape)
    sampling = _check_token_tensor("sampling_log_probs", sampling_log_probs, shape)
    ratio = _check_per_sequence_or_token("importance_sampling_ratio", importance_sampling_ratio, shape)
    entropy = _check_token_tensor("entropy", entropy, shape)
    _refuse_grad(
        old_log_probs=old,
        ref_log_probs=ref,
        sampling_log_probs=sampling,
        importance_sampling_ratio=ratio,
        advantages=advantages,
    )
    if beta != 0.0 and ref is None:
        raise ValueError(f"beta={beta:g} weighs the KL to the reference policy; pass ref_log_probs (B, T)")
    if entropy is None and (top_entropy_quantile < 1.0 or entropy_coef != 0.0):
        option = "entropy_coef" if entropy_coef != 0.0 else "top_entropy_quantile"
        value = entropy_coef if entropy_coef != 0.0 else top_entropy_quantile
        raise ValueError(f"{option}={value:g} reads each token's entropy; pass entropy (B, T)")
    if loss_type == "vespo" and ratio is not None and ratio.shape != shape:
        raise ValueError(
            f"importance_sampling_ratio has shape {checks.shape_str(ratio.shape)}, but loss_type='vespo' folds "
            f"per-token rollout ratios {checks.shape_str(shape)} into its sequence weight (TRL's token_truncate or "
            "token_mask modes)"
        )

    dtype = accumulation_dtype(log_probs.dtype)
    m = keep.to(dtype)  # (B, T)

    def read(tensor: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        # padding is read as `fill`: whatever it holds (NaN, -inf) cannot reach the loss or a gradient
        tensor = tensor.to(dtype)
        if tensor.shape != shape:
            return tensor
        return torch.where(keep, tensor, torch.full((), fill, dtype=dtype, device=tensor.device))

    lp = read(log_probs)
    adv = advantages.to(dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # (B, 1) or (B, T)
    old_lp = lp.detach() if old is None else read(old)
    ent = None if entropy is None else read(entropy)

    entropy_mask = None
    if top_entropy_quantile < 1.0 and ent is not None:  # ent is given: checked above
        entropy_mask = high_entropy_mask(ent.detach(), keep, 1.0 - top_entropy_quantile)

    off_policy_mask = None
    if threshold is not None:
        sampled = old_lp if sampling is None else read(sampling)
        off_policy_mask = off_policy_sequence_mask(adv, lp, sampled, m, threshold)

    log_ratio = lp - old_lp
    if importance_sampling_level == "token":
        log_weight = log_ratio
    else:  # GSPO: the geometric mean of the sequence's token ratios
        log_weight = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_weight)  # (B, T) or (B, 1)

    per_token_kl = None
    if ref is not None:
        ref_minus = read(ref) - lp
        per_token_kl = torch.exp(ref_minus) - ref_minus - 1  # k3: unbiased, ≥ 0
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    phi = None
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * lp
    elif loss_type in _CLIPPED:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        # TRL's torch.where of two Python numbers makes float32 temperatures (1.05 → 1.0499999523); so does this
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg).to(dtype)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    else:  # vespo
        gamma = (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        phi = _vespo_weights(adv, log_ratio, m, None if ratio is None else read(ratio, 1.0), gamma)
        per_token = -phi * adv * lp

    if off_policy_mask is not None:
        per_token = per_token * off_policy_mask
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if ratio is not None and loss_type != "vespo":
        rollout = ratio.to(dtype).unsqueeze(1) if ratio.dim() == 1 else read(ratio, 1.0)
        per_token = per_token * rollout
    if beta != 0.0 and per_token_kl is not None:  # ref_log_probs is given: checked above
        per_token = per_token + beta * per_token_kl
    masked = per_token * m  # (B, T)

    accumulation = float(gradient_accumulation_steps)
    if loss_type in ("grpo", "sapo"):
        aggregated = _mean_over_sequences(masked.sum(-1) / m.sum(-1).clamp(min=1.0))
    elif loss_type == "bnpo":
        aggregated = masked.sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        aggregated = masked.sum() / max(batch * int(max_completion_length or 1), 1)
    elif loss_type == "luspo":
        aggregated = _mean_over_sequences(masked.sum(-1))
    else:  # dapo, cispo, vespo: the window's token count, already the accumulation's mean
        count = m.sum() * accumulation
        if num_items_in_batch is not None:
            count = torch.as_tensor(num_items_in_batch, dtype=dtype, device=lp.device).reshape(())
        aggregated = safe_divide(masked.sum(), count)
        accumulation = 1.0
    loss = aggregated / accumulation if accumulation != 1.0 else aggregated

    if entropy_coef != 0.0 and ent is not None:  # ent is given: checked above
        kept = m if entropy_mask is None else m * entropy_mask
        bonus = (ent * kept).sum() / kept.sum().clamp(min=1.0) / float(gradient_accumulation_steps)
        loss = loss - entropy_coef * bonus

    metrics = _metrics(loss_type, coef_1, adv, m, per_token_kl, ent, phi, epsilon_low, epsilon_high)
    return PolicyLoss(
        loss=loss.to(log_probs.dtype),
        per_token_loss=masked.to(log_probs.dtype),
        policy_loss=aggregated.detach(),
        **metrics,
    )


def _mean_over_sequences(per_sequence: torch.Tensor) -> torch.Tensor:
    """The mean of ``(B,)`` values, 0 for an empty batch (where ``mean`` gives NaN)."""
    return per_sequence.mean() if per_sequence.numel() else per_sequence.sum()


def _metrics(
    loss_type: str,
    coef_1: torch.Tensor,
    adv: torch.Tensor,
    m: torch.Tensor,
    per_token_kl: torch.Tensor | None,
    ent: torch.Tensor | None,
    phi: torch.Tensor | None,
    epsilon_low: float,
    epsilon_high: float,
) -> dict[str, torch.Tensor | None]:
    """The metrics TRL logs, on one process: masked token means, or means over sequences for ``(B, 1)`` values."""

    def mean(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if x.shape[1] == 1:  # one value per sequence (sequence level with (B,) advantages): over the B rows
                return x.sum() / max(x.shape[0], 1)
            x = x.expand_as(m)
            return (x * m).sum() / m.sum().clamp(min=1.0)

    out: dict[str, torch.Tensor | None] = {
        "kl": None if per_token_kl is None else mean(per_token_kl),
        "entropy": None if ent is None else mean(ent),
    }
    if loss_type in _CLIPPED:
        low = (coef_1 < 1 - epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + epsilon_high) & (adv > 0)
        out["clip_ratio_low"] = mean(low.to(m.dtype))
        out["clip_ratio_high"] = mean(high.to(m.dtype))
        out["clip_ratio_region"] = mean((low | high).to(m.dtype))
    elif loss_type == "cispo":
        out["cispo_clip_ratio"] = mean(((coef_1 > epsilon_high) & (adv > 0)).to(m.dtype))
    elif loss_type == "vespo" and phi is not None:
        out["vespo_phi_mean"] = mean(phi)
    return out


def high_entropy_mask(entropy: torch.Tensor, keep: torch.Tensor, quantile: float) -> torch.Tensor:
    """``(B, T)`` bool: the kept tokens whose entropy is at or above the ``quantile`` of the kept tokens' entropies
    (TRL's ``get_high_entropy_mask`` on one process). The quantile is ``torch.quantile``'s linear interpolation in
    float32, as TRL computes it, but from a sort with the padding at the end, so that no host sync reads the count
    and no size limit applies."""
    if entropy.numel() == 0:
        return torch.zeros_like(keep)
    values = torch.where(keep, entropy, torch.full((), math.inf, dtype=entropy.dtype, device=entropy.device))
    ordered = values.reshape(-1).float().sort().values
    count = keep.sum()
    rank = torch.tensor(quantile, dtype=torch.float32, device=entropy.device) * (count - 1).float()
    below = rank.long().clamp(min=0)  # rank < 0 only for an empty mask, which keeps nothing anyway
    above = rank.ceil().long().clamp(min=0)
    threshold = torch.lerp(ordered[below], ordered[above], rank - below.float())
    return (entropy * keep.to(entropy.dtype) >= threshold) & keep


def off_policy_sequence_mask(
    advantages: torch.Tensor,
    log_probs: torch.Tensor,
    sampling_log_probs: torch.Tensor,
    m: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """``(B, 1)`` (or ``(B, T)`` for per-token advantages) 1 to keep, 0 to drop: DeepSeek-V3.2's off-policy
    sequence mask, TRL's ``get_off_policy_mask``: keep where :math:`A \\ge 0` or the sequence's mean
    :math:`\\log \\pi_{sampling} - \\log \\pi_\\theta` is at most ``threshold``."""
    kl = torch.nan_to_num(sampling_log_probs - log_probs.detach(), nan=0.0)  # unscored tokens give no evidence
    mean_kl = (kl * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(m.dtype)


@torch.no_grad()
def _vespo_weights(
    adv: torch.Tensor,
    log_ratio: torch.Tensor,
    m: torch.Tensor,
    rollout_ratio: torch.Tensor | None,
    gamma: tuple[float, float, float, float],
) -> torch.Tensor:
    """``(B, 1)`` VESPO's detached gamma weight :math:`\\phi(W) = e^{\\lambda} W^k e^{-\\lambda W}` of the sequence
    ratio, in log space with TRL's clamps (``GRPOTrainer.get_gamma_weights``)."""
    k_pos, lambda_pos, k_neg, lambda_neg = gamma
    lowest = math.log(1e-8)
    log_w = (torch.clamp(log_ratio, -20.0, 20.0) * m).sum(-1, keepdim=True)
    if rollout_ratio is not None:
        log_w = log_w + torch.clamp(torch.log(rollout_ratio), lowest, 20.0).sum(-1, keepdim=True)
    log_w = torch.clamp(log_w, lowest, 20.0)
    nonneg = adv >= 0
    k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def rollout_importance_ratio(
    old_log_probs: torch.Tensor,
    sampling_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> torch.Tensor:
    r"""The importance ratio :math:`\pi_{old} / \pi_{sampling}` that corrects for completions sampled by another
    engine (vLLM) whose log-probabilities differ from the trainer's, truncated or masked: TRL 1.16's
    ``vllm_importance_sampling_correction``, to pass to :func:`policy_loss` as ``importance_sampling_ratio``.

    .. math::
        \rho = \exp \sum (\log \pi_{old} - \log \pi_{sampling})

    per token (``"token_*"``, ``(B, T)``) or summed over the sequence's tokens (``"sequence_*"``, ``(B, 1)``), then
    ``"*_truncate"``: clamped to ``[clip_min, clip_max]`` (truncated importance sampling, TIS);
    ``"*_mask"``: set to 0 outside it (masked importance sampling). Tokens whose sampling log-probability is NaN
    (the engine gave none) and padding get a log-ratio of 0. The arguments are ``GRPOConfig``'s
    ``vllm_importance_sampling_mode``, ``vllm_importance_sampling_clip_min`` and ``..._clip_max``, with their defaults.
    Not differentiable (its inputs are the old and the sampling policies').

    Args:
        old_log_probs: ``(B, T)`` the trainer's log-probabilities of the sampled tokens before the update.
        sampling_log_probs: ``(B, T)`` the sampling engine's, NaN where it gave none.
        mask: ``(B, T)`` the completion tokens, 0/1.
        mode: ``"token_truncate"``, ``"token_mask"``, ``"sequence_truncate"`` or ``"sequence_mask"``.
        clip_min, clip_max: the bounds, ``None`` for none; a truncate mode needs at least one.

    Returns:
        ``(B, T)`` or ``(B, 1)`` ratios, detached, in float32 (float64 for float64 inputs).
    """
    if mode not in ROLLOUT_IMPORTANCE_MODES:
        options = ", ".join(map(repr, ROLLOUT_IMPORTANCE_MODES))
        raise ValueError(f"mode must be one of {options}, got {checks.shown(mode)}")
    low = None if clip_min is None else checks.check_in_range("clip_min", clip_min, 0.0, math.inf)
    high = None if clip_max is None else checks.check_in_range("clip_max", clip_max, 0.0, math.inf)
    if low is not None and high is not None and low >= high:
        raise ValueError(f"clip_min must be less than clip_max, got clip_min={low:g} and clip_max={high:g}")
    if mode.endswith("_truncate") and low is None and high is None:
        raise ValueError(f"mode={mode!r} truncates the ratio: give clip_min or clip_max (or both)")
    old = checks.check_floating("old_log_probs", old_log_probs)
    if old.dim() != 2:
        raise ValueError(f"old_log_probs must have shape (B, T), got shape {checks.shape_str(old.shape)}")
    sampling = checks.check_floating("sampling_log_probs", sampling_log_probs)
    _check_token_tensor("sampling_log_probs", sampling, old.shape)
    keep = _check_mask(mask, old.shape)
    dtype = accumulation_dtype(old.dtype)
    with torch.no_grad():
        diff = torch.nan_to_num((old.to(dtype) - sampling.to(dtype)) * keep.to(dtype), nan=0.0)
        diff = torch.where(keep, diff, torch.zeros((), dtype=dtype, device=diff.device))
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        ratio = torch.exp(diff)
        if mode.endswith("_truncate"):
            return torch.clamp(ratio, min=low, max=high)
        outside = (ratio < (-math.inf if low is None else low)) | (ratio > (math.inf if high is None else high))
        return ratio.masked_fill(outside, 0.0)


# -- checks ---------------------------------------------------------------------------------------------------------


def _check_options(
    *,
    loss_type: object,
    importance_sampling_level: object,
    use_bias_correction_kl: object,
    delta: object,
    max_completion_length: object,
    num_items_in_batch: object,
    gradient_accumulation_steps: object,
) -> None:
    """The options that select, or belong to, a loss type."""
    if not isinstance(loss_type, str) or loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(
            f"loss_type must be one of {', '.join(map(repr, POLICY_LOSS_TYPES))}, got {checks.shown(loss_type)}"
        )
    if not isinstance(importance_sampling_level, str) or importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            "importance_sampling_level must be 'token' or 'sequence', got " + checks.shown(importance_sampling_level)
        )
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl must be a bool, got {checks.shown(use_bias_correction_kl)}")
    if delta is not None:
        if loss_type not in _CLIPPED:
            raise ValueError(
                f"delta caps the ratio of the clipped loss types ({', '.join(_CLIPPED)}); loss_type={loss_type!r} "
                f"has no such clip, got delta={checks.shown(delta)}"
            )
        checks.check_in_range("delta", delta, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError(
                "loss_type='dr_grpo' divides by batch size × max_completion_length; pass max_completion_length "
                "(GRPOConfig's, 512 by default), the longest completion the sampler may produce"
            )
        if (
            isinstance(max_completion_length, bool)
            or not isinstance(max_completion_length, int)
            or max_completion_length < 1
        ):
            raise ValueError(f"max_completion_length must be a positive int, got {checks.shown(max_completion_length)}")
    elif max_completion_length is not None:
        raise ValueError(
            f"max_completion_length is dr_grpo's constant denominator; loss_type={loss_type!r} does not read it, got "
            f"max_completion_length={checks.shown(max_completion_length)}"
        )
    if num_items_in_batch is not None:
        if loss_type not in _BY_TOKEN_COUNT:
            raise ValueError(
                f"num_items_in_batch is the token count that dapo, cispo and vespo divide by; loss_type={loss_type!r} "
                "does not read it (TRL ignores it there): leave it out, and divide by the accumulation steps with "
                "gradient_accumulation_steps"
            )
        _check_count(num_items_in_batch)
    if (
        isinstance(gradient_accumulation_steps, bool)
        or not isinstance(gradient_accumulation_steps, int)
        or gradient_accumulation_steps < 1
    ):
        raise ValueError(
            f"gradient_accumulation_steps must be a positive int, got {checks.shown(gradient_accumulation_steps)}"
        )


def _check_count(value: object) -> None:
    """``num_items_in_batch``: a finite number ≥ 0 or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                "num_items_in_batch must be a number or a one-element tensor, got shape "
                + checks.shape_str(value.shape)
            )
        return
    checks.check_in_range("num_items_in_batch", value, 0.0, math.inf, high_inclusive=False)


def _check_mask(mask: object, shape: torch.Size) -> torch.Tensor:
    """``mask`` as bool ``(B, T)``: the same shape as ``log_probs``, values 0 and 1 (value-checked)."""
    from xent._config import value_checks_enabled

    mask = checks.check_tensor("mask", mask)
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or floating, got dtype {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(
            f"mask has shape {checks.shape_str(mask.shape)} but log_probs has shape {checks.shape_str(shape)}; "
            "they must be equal (one entry per completion token)"
        )
    if mask.dtype != torch.bool and value_checks_enabled(mask) and mask.numel():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"mask must hold 0 and 1 only, got {float(mask[index]):g} at index {index}")
    return mask != 0


def _check_token_tensor(name: str, tensor: object, shape: torch.Size) -> torch.Tensor | None:
    if tensor is None:
        return None
    tensor = checks.check_floating(name, tensor)
    if tensor.shape != shape:
        raise ValueError(
            f"{name} has shape {checks.shape_str(tensor.shape)} but log_probs has shape {checks.shape_str(shape)}; "
            "they must be equal"
        )
    return tensor


def _check_per_sequence_or_token(name: str, tensor: object, shape: torch.Size) -> torch.Tensor | None:
    """A tensor of one value per sequence, ``(B,)`` or ``(B, 1)``, or per token, ``(B, T)``."""
    if tensor is None:
        return None
    tensor = checks.check_floating(name, tensor)
    batch = shape[0]
    if tensor.shape not in ((batch,), (batch, 1), shape):
        raise ValueError(
            f"{name} has shape {checks.shape_str(tensor.shape)}; expected ({batch},) or ({batch}, 1), one per "
            f"sequence, or {checks.shape_str(shape)}, one per token (log_probs has shape {checks.shape_str(shape)})"
        )
    return tensor


def _refuse_grad(**tensors: torch.Tensor | None) -> None:
    """The old, reference and sampling policies, the advantages and the rollout ratio are constants of the objective:
    one that requires grad (say ``old_log_probs=log_probs`` without ``.detach()``, which makes every ratio 1 with
    no gradient) is refused rather than differentiated."""
    if not torch.is_grad_enabled():
        return
    for name, tensor in tensors.items():
        if tensor is not None and tensor.requires_grad:
            raise ValueError(
                f"{name} requires grad, but policy_loss differentiates log_probs and entropy only; pass "
                f"{name}.detach() (or compute it under torch.no_grad())"
            )
