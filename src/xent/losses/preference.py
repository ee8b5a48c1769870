r"""Preference optimisation on per-sequence log-probabilities: the DPO family, SimPO, CPO, ORPO and KTO.

Every loss here reads the log-probability of whole completions, :math:`\log \pi_\theta(y \mid x) =
\sum_t \log \pi_\theta(y_t \mid x, y_{<t})` summed over the completion's tokens (what ``xent.linear_log_probs``
gives per token, summed under the completion mask), and optionally the same under a frozen reference model. With
the log-ratios :math:`h_w = \log \pi_\theta(y_w) - \log \pi_{ref}(y_w)` and :math:`h_l` of the chosen and rejected
completions, DPO minimises :math:`-\log \sigma(\beta (h_w - h_l))`; the other methods change the link or the scores.

The definitions are TRL 1.16's: ``DPOTrainer._compute_loss`` (every ``loss_type``, the f-divergences, WPO weights,
several loss types combined), ``CPOTrainer.cpo_loss`` (SimPO, CPO), ``ORPOTrainer.odds_ratio_loss`` and
``KTOTrainer._compute_loss``. Where TRL differs from itself or from a paper, the docstrings say so.

Data flow: inputs ``(B,)`` → log-ratios → f-divergence scores → per-pair losses (one per loss type, weighted) →
mean over pairs (+ the NLL term); the rewards and margins trainers log come along, detached.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from xent.core.autocast import result_dtype
from xent.core.reduce import accumulation_dtype, safe_divide
from xent.losses import checks

__all__ = [
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "KTO_LOSS_TYPES",
    "PREFERENCE_LOSS_TYPES",
    "KTOLoss",
    "PreferenceLoss",
    "kto_loss",
    "preference_loss",
    "wpo_weights",
]

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# Reference-free methods of their own trainers (CPOTrainer's SimPO, ORPOTrainer): not combined with others.
_STANDALONE = ("simpo", "orpo")
PREFERENCE_LOSS_TYPES = DPO_LOSS_TYPES + _STANDALONE
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# f-DPO leaves a β log Z(x) term that cancels only in the chosen − rejected difference (TRL's list).
_F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
_NEEDS_BOTH_LENGTHS = ("ipo", "sigmoid_norm", "simpo", "orpo")
# label_smoothing's interval for each loss type that defines it: (low, high, low_inclusive, high_inclusive)
_SMOOTHING = {
    "sigmoid": (0.0, 0.5, True, True),  # conservative DPO (cDPO)
    "simpo": (0.0, 0.5, True, True),
    "aot": (0.0, 0.5, True, True),
    "aot_unpaired": (0.0, 0.5, True, True),
    "robust": (0.0, 0.5, True, False),  # divides by 1 − 2ε
    "exo_pair": (0.0, 1.0, False, False),  # takes log ε and log(1 − ε)
}
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """What :func:`preference_loss` returns. Every field has the dtype of ``chosen_log_probs`` (float32 under
    autocast); the rewards and their statistics are detached."""

    loss: torch.Tensor
    """The scalar to minimise, the mean of ``per_pair_loss`` over the pairs, plus ``nll_weight · nll_loss`` (0 for an
    empty batch, with a zero gradient)."""
    per_pair_loss: torch.Tensor
    """``(B,)``: the preference term of each pair, the loss types weighted by ``loss_weights`` and the pair by
    ``weights``. For ``"aot"``/``"aot_unpaired"`` entry i belongs to the i-th smallest sorted margins, not pair i; for
    ``"sft"`` every entry is the batch's NLL (TRL's convention: only their mean means anything)."""
    chosen_rewards: torch.Tensor
    """``(B,)``: the implicit reward of each chosen completion, as TRL logs ``rewards/chosen``: β times the log-ratio
    to the reference (the log-probability itself without a reference; its per-token mean for ``"simpo"`` and
    ``"orpo"``, as CPOTrainer and ORPOTrainer log it)."""
    rejected_rewards: torch.Tensor
    """``(B,)``: the same for the rejected completions (``rewards/rejected``)."""
    reward_margins: torch.Tensor
    """``(B,)``: ``chosen_rewards − rejected_rewards`` (``rewards/margins`` is its mean)."""
    reward_accuracies: torch.Tensor
    """``(B,)``: 1.0 where ``chosen_rewards > rejected_rewards``, else 0.0 (``rewards/accuracies`` is its mean)."""
    nll_loss: torch.Tensor | None
    """The NLL term (shape ``()``) when ``nll_weight`` is not 0 (``nll_loss`` in CPOTrainer's and ORPOTrainer's logs),
    else None."""
    log_odds: torch.Tensor | None
    """``(B,)`` for ``"orpo"``: the log odds ratio of the chosen over the rejected completion (ORPOTrainer logs its mean
    as ``log_odds_chosen`` and the mean of its log-sigmoid as ``log_odds_ratio``); None otherwise."""


@dataclasses.dataclass(frozen=True)
class KTOLoss:
    """What :func:`kto_loss` returns. Every field has the dtype of ``log_probs`` (float32 under autocast); all but
    ``loss`` and ``per_example_loss`` are detached."""

    loss: torch.Tensor
    """The scalar to minimise, the mean of ``per_example_loss`` (0 for an empty batch, where TRL gives NaN)."""
    per_example_loss: torch.Tensor
    """``(B,)``: each example's loss, weighted by ``desirable_weight`` or ``undesirable_weight``, in input order."""
    rewards: torch.Tensor
    """``(B,)``: β times each completion's log-ratio to the reference (``rewards/chosen`` and ``rewards/rejected`` are
    its means over the desirable and the undesirable examples)."""
    reward_margin: torch.Tensor
    """``()``: the mean reward of the desirable examples minus that of the undesirable ones (``rewards/margins``; 0
    when either kind is missing, where TRL logs nothing)."""
    kl: torch.Tensor
    """``()``: the KL estimate the loss used (``kl``): ``max(0, mean(kl_log_probs − ref_kl_log_probs))``; 0 for
    ``"apo_zero_unpaired"``."""


def preference_loss(
    chosen_log_probs: torch.Tensor,
    rejected_log_probs: torch.Tensor,
    *,
    ref_chosen_log_probs: torch.Tensor | None = None,
    ref_rejected_log_probs: torch.Tensor | None = None,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    nll_weight: float | None = None,
    nll_loss: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> PreferenceLoss:
    r"""Preference loss of pairs of chosen and rejected completions, from their per-sequence log-probabilities.

    With the log-ratios :math:`h_w = \log\pi_\theta(y_w) - \log\pi_{ref}(y_w)`, :math:`h_l` likewise (the
    log-probabilities themselves without a reference), the scores :math:`s = f'(\pi_\theta / \pi_{ref})` of
    ``f_divergence_type`` (:math:`s = h` for the reverse KL, the default), :math:`\Delta = s_w - s_l`, the per-token
    means :math:`\bar s = s / |y|` and :math:`\sigma` the logistic function, ``loss_type`` is one of

    .. math::
        \begin{aligned}
        &\texttt{sigmoid} \text{ (DPO; cDPO with } \varepsilon)  && -(1-\varepsilon)\log\sigma(\beta\Delta)
            - \varepsilon\log\sigma(-\beta\Delta) \\
        &\texttt{hinge} \text{ (SLiC)} && \max(0, 1 - \beta\Delta) \\
        &\texttt{ipo} && (\bar s_w - \bar s_l - 1/(2\beta))^2 \\
        &\texttt{exo\_pair} && \sigma(\beta\Delta)\log\tfrac{\sigma(\beta\Delta)}{1-\varepsilon}
            + \sigma(-\beta\Delta)\log\tfrac{\sigma(-\beta\Delta)}{\varepsilon} \\
        &\texttt{nca\_pair} && -\log\sigma(\beta h_w) - \tfrac12\log\sigma(-\beta h_w)
            - \tfrac12\log\sigma(-\beta h_l) \\
        &\texttt{robust} && \bigl(-(1-\varepsilon)\log\sigma(\beta\Delta)
            + \varepsilon\log\sigma(-\beta\Delta)\bigr) / (1 - 2\varepsilon) \\
        &\texttt{bco\_pair} && -\log\sigma(\beta h_w) - \log\sigma(-\beta h_l) \\
        &\texttt{sppo\_hard} && (h_w - \tfrac{1}{2\beta})^2 + (h_l + \tfrac{1}{2\beta})^2 \\
        &\texttt{aot} && \text{sigmoid's smoothed loss of } \operatorname{sort}(\log\pi_\theta(y_w) -
            \log\pi_\theta(y_l))_i - \operatorname{sort}(\log\pi_{ref}(y_w) - \log\pi_{ref}(y_l))_i \\
        &\texttt{aot\_unpaired} && \text{the same of } \operatorname{sort}(h_w)_i - \operatorname{sort}(h_l)_i \\
        &\texttt{apo\_zero} && 1 - \sigma(\beta h_w) + \sigma(\beta h_l) \\
        &\texttt{apo\_down} && \sigma(\beta h_w) + 1 - \sigma(\beta (h_w - h_l)) \\
        &\texttt{discopop} && -\log\sigma(\beta\Delta)(1 - m) + e^{-\beta\Delta} m,
            \quad m = \sigma(\beta\Delta/\tau) \\
        &\texttt{sft} && -\textstyle\sum_i \log\pi_\theta(y_{w,i}) / \sum_i |y_{w,i}| \text{ (every pair the same)} \\
        &\texttt{sigmoid\_norm} && -\log\sigma(\beta(\bar s_w - \bar s_l)) \\
        &\texttt{simpo} \text{ (no reference)} && \text{sigmoid's smoothed loss of }
            \bar\ell_w - \bar\ell_l - \gamma/\beta, \quad \bar\ell = \log\pi_\theta(y) / |y| \\
        &\texttt{orpo} \text{ (no reference)} && -\beta\log\sigma\Bigl(\log\tfrac{\bar p_w}{1 - \bar p_w}
            - \log\tfrac{\bar p_l}{1 - \bar p_l}\Bigr), \quad \bar p = e^{\bar\ell}
        \end{aligned}

    and the loss is :math:`\operatorname{mean}_i(\omega_i \sum_k \lambda_k \ell_{k,i}) + \alpha\, \mathrm{NLL}` with
    the loss weights :math:`\lambda` (MPO), the pair weights :math:`\omega` (WPO) and the NLL term of CPO, RPO and
    ORPO: :math:`\mathrm{NLL} = -\sum_i \log\pi_\theta(y_{w,i}) / \sum_i |y_{w,i}|`, the mean over the chosen
    completions' tokens.

    **Methods.** DPO and its variants are ``DPOTrainer``'s: ``loss_type`` and ``loss_weights`` as ``DPOConfig`` names
    them. CPO is ``"sigmoid"`` (or ``"hinge"``, ``"ipo"``) without a reference and ``nll_weight=1.0``
    (``CPOConfig.cpo_alpha``; CPOTrainer's ``"ipo"`` logs β times the mean log-probabilities as rewards, here
    the sums as DPOTrainer's); SimPO is ``"simpo"`` without a reference (``CPOTrainer`` adds the NLL with its default
    ``cpo_alpha=1.0``: pass ``nll_weight=1.0`` for that, 0 — the default here — for the paper's SimPO). ORPO is
    ``"orpo"``, whose NLL weight is 1 (β weighs the odds-ratio term, ``ORPOConfig.beta``). Reference-free DPO
    (``"sigmoid"`` without a reference) is CPO without its NLL. Unpaired data (KTO) is :func:`kto_loss`.

    **Length normalisation.** The log-probabilities are sums over each completion's tokens (TRL's ``logps``). The
    loss types that average them (``"ipo"``, ``"sigmoid_norm"``, ``"simpo"``, ``"orpo"``), ``"sft"`` and the NLL term
    need the completions' token counts ``chosen_lengths``/``rejected_lengths`` (counts of 0 are taken as 1 in the
    averages, as TRL's ``clamp(min=1)``). Callers that only have per-token means pass them with lengths of ones —
    except for ``"sft"`` and the NLL term, which weigh every token alike. LD-DPO (``DPOConfig.ld_alpha``) is a way of
    summing: pass its down-weighted sums.

    **Label smoothing** ε is read by the loss types that define it and refused by the others: ``"sigmoid"``,
    ``"simpo"``, ``"aot"``, ``"aot_unpaired"`` (ε ∈ [0, 0.5], the probability that a label is flipped), ``"robust"``
    (ε ∈ [0, 0.5)) and ``"exo_pair"`` (ε ∈ (0, 1), required; the paper recommends 1e-3). TRL 1.16's
    ``DPOTrainer`` ignores ε for ``"sigmoid"`` (CPOTrainer and TRL's earlier DPOTrainer apply it as here): leave it 0
    to match, also when ``"sigmoid"`` is combined with ``"exo_pair"``. TRL only warns for ``"robust"`` outside
    [0, 0.5); here it is an error.

    Args:
        chosen_log_probs: ``(B,)`` summed log-probabilities of the chosen completions under the policy.
        rejected_log_probs: ``(B,)`` the same of the rejected completions.
        ref_chosen_log_probs, ref_rejected_log_probs: ``(B,)`` the same under the reference model (precomputed or
            from a reference forward pass under ``torch.no_grad()``), both or neither; neither means no reference
            (log-ratios are the log-probabilities). ``"simpo"`` and ``"orpo"`` take none.
        loss_type: one of ``PREFERENCE_LOSS_TYPES``, or a sequence of the DPO ones combined (MPO).
        loss_weights: one weight per loss type (``DPOConfig.loss_weights``), ones by default.
        beta: β > 0; IPO's regularisation τ for ``"ipo"``, ORPO's λ for ``"orpo"``.
        label_smoothing: ε, see above.
        chosen_lengths, rejected_lengths: ``(B,)`` token counts of the completions (integer or floating), see above.
        f_divergence_type: ``"reverse_kl"`` (DPO), ``"forward_kl"``, ``"js_divergence"`` or ``"alpha_divergence"``
            (f-DPO), for ``"sigmoid"``, ``"sigmoid_norm"``, ``"hinge"``, ``"ipo"``, ``"exo_pair"``, ``"robust"``,
            ``"discopop"`` and ``"sft"`` only, as TRL. The α-divergence's exponent is clamped at 80 as TRL's.
        f_alpha_divergence_coef: α of the α-divergence, :math:`f'(t) = (t^{\alpha-1} - 1)/(\alpha - 1)`; within 1e-6
            of 1 it is the reverse KL (TRL's rule).
        discopop_tau: DiscoPOP's τ > 0 (0.05, the paper's).
        simpo_gamma: SimPO's target margin γ (``CPOConfig.simpo_gamma``, 0.5).
        nll_weight: α ≥ 0, the weight of the NLL term: 1.0 for ``"orpo"``, 0.0 otherwise by default.
        nll_loss: the NLL term itself, shape ``()``, when it is computed otherwise — ``ORPOTrainer``'s covers the
            prompt tokens too. By default it is computed from ``chosen_log_probs`` and ``chosen_lengths``.
        weights: ``(B,)`` pair weights ω, e.g. WPO's (``DPOConfig.use_weighting``): ``wpo_weights`` of the chosen
            completions times those of the rejected ones. Refused with ``"aot"``/``"aot_unpaired"``, which sort the
            pairs apart (TRL refuses them too).

    Returns:
        :class:`PreferenceLoss`: ``loss``, ``per_pair_loss``, the rewards, margins and accuracies trainers log, and
        ``nll_loss``/``log_odds`` where the method has them.

    References:
        Rafailov et al. Direct Preference Optimization (2023); Azar et al. A General Theoretical Paradigm to Understand
        Learning from Human Preferences (IPO, 2023); Zhao et al. SLiC-HF (2023); Ji et al. Towards Efficient Exact
        Optimization of Language Model Alignment (EXO, 2024); Chen et al. Noise Contrastive Alignment (NCA, 2024);
        Chowdhury et al. Provably Robust DPO (2024); Jung et al. Binary Classifier Optimization (BCO, 2024); Wu et al.
        Self-Play Preference Optimization (SPPO, 2024); Melnyk et al. Distributional Preference Alignment (AOT, 2024);
        D'Oosterlinck et al. Anchored Preference Optimization (APO, 2024); Chris Lu et al. Discovering Preference
        Optimization Algorithms (DiscoPOP, 2024); Wang et al. Beyond Reverse KL (f-DPO, 2023); Zhou et al. WPO (2024);
        Xu et al. Contrastive Preference Optimization (CPO, 2024); Meng et al. SimPO (2024); Hong et al. ORPO (2024).
    """
    types = _check_loss_types(loss_type)
    chosen = checks.check_floating("chosen_log_probs", chosen_log_probs)
    if chosen.dim() != 1:
        raise ValueError(
            f"chosen_log_probs has shape {checks.shape_str(chosen.shape)}; expected (B,), one summed log-probability "
            "per completion"
        )
    pairs = chosen.shape
    rejected = _check_like("rejected_log_probs", rejected_log_probs, pairs)
    if (ref_chosen_log_probs is None) != (ref_rejected_log_probs is None):
        missing = "ref_rejected_log_probs" if ref_rejected_log_probs is None else "ref_chosen_log_probs"
        raise ValueError(f"give both reference log-probabilities or neither; {missing} is missing")
    has_reference = ref_chosen_log_probs is not None
    if has_reference and types[0] in _STANDALONE:
        raise ValueError(
            f"loss_type={types[0]!r} is reference-free; got ref_chosen_log_probs and ref_rejected_log_probs"
        )
    beta = checks.check_in_range("beta", beta, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
    lambdas = _check_loss_weights(loss_weights, types)
    epsilon = _check_label_smoothing(label_smoothing, types)
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        options = ", ".join(map(repr, F_DIVERGENCE_TYPES))
        raise ValueError(f"f_divergence_type must be one of {options}, got {checks.shown(f_divergence_type)}")
    alpha = checks.check_in_range("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if f_divergence_type != "reverse_kl" and not set(types) <= set(_F_DIVERGENCE_LOSS_TYPES):
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is defined for loss types {', '.join(_F_DIVERGENCE_LOSS_TYPES)} "
            f"only (the others have no f-divergence generalization), got loss_type {list(types)}"
        )
    tau = checks.check_in_range("discopop_tau", discopop_tau, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
    gamma = checks.check_in_range("simpo_gamma", simpo_gamma)
    nll_alpha = checks.check_in_range(
        "nll_weight", 1.0 if nll_weight is None and types[0] == "orpo" else nll_weight or 0.0, 0.0
    )
    if nll_loss is not None:
        if nll_alpha == 0:
            raise ValueError("nll_loss is read only with nll_weight > 0 (and by loss_type 'orpo')")
        nll_loss = checks.check_floating("nll_loss", nll_loss)
        if nll_loss.dim() != 0:
            raise ValueError(f"nll_loss has shape {checks.shape_str(nll_loss.shape)}; expected a scalar, shape ()")
    needs_chosen = any(t in _NEEDS_BOTH_LENGTHS or t == "sft" for t in types) or (nll_alpha and nll_loss is None)
    needs_rejected = any(t in _NEEDS_BOTH_LENGTHS for t in types)
    lengths_w = _check_lengths("chosen_lengths", chosen_lengths, pairs, needs_chosen, types)
    lengths_l = _check_lengths("rejected_lengths", rejected_lengths, pairs, needs_rejected, types)
    if weights is not None:
        weights = _check_like("weights", weights, pairs)
        checks.check_non_negative("weights", weights)
        if {"aot", "aot_unpaired"} & set(types):
            raise ValueError("weights are per pair, but 'aot' and 'aot_unpaired' sort the pairs apart; drop weights")

    dtype = accumulation_dtype(chosen.dtype)
    logp_w, logp_l = chosen.to(dtype), rejected.to(dtype)
    ref_w = ref_l = None
    if has_reference:
        ref_w = _check_like("ref_chosen_log_probs", ref_chosen_log_probs, pairs).to(dtype)
        ref_l = _check_like("ref_rejected_log_probs", ref_rejected_log_probs, pairs).to(dtype)
    h_w = logp_w - ref_w if ref_w is not None else logp_w
    h_l = logp_l - ref_l if ref_l is not None else logp_l
    s_w, s_l = _scores(h_w, f_divergence_type, alpha), _scores(h_l, f_divergence_type, alpha)
    # token counts; ones stand in where no loss type reads them (the checks above refused a missing one)
    ones = torch.ones(pairs, dtype=dtype, device=chosen.device)
    tokens_w = ones if lengths_w is None else lengths_w.to(dtype)
    count_w = tokens_w.clamp(min=1.0)
    count_l = ones if lengths_l is None else lengths_l.to(dtype).clamp(min=1.0)

    per_pair = torch.zeros(pairs, dtype=dtype, device=chosen.device)
    log_odds = None
    rewards_w, rewards_l = beta * h_w.detach(), beta * h_l.detach()
    for kind, weight in zip(types, lambdas, strict=True):
        delta = s_w - s_l
        if kind == "sigmoid":
            term = _smoothed_sigmoid(beta * delta, epsilon)
        elif kind == "hinge":
            term = torch.relu(1 - beta * delta)
        elif kind == "ipo":
            term = (s_w / count_w - s_l / count_l - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":
            # KL(softmax(βΔ) over {w, l} ‖ (1 − ε, ε)), written with log-sigmoids for stability (EXO-pref, Eq. 16)
            z = beta * delta
            term = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-epsilon)) + torch.sigmoid(-z) * (
                F.logsigmoid(-z) - math.log(epsilon)
            )
        elif kind == "nca_pair":
            term = -F.logsigmoid(beta * h_w) - 0.5 * F.logsigmoid(-beta * h_w) - 0.5 * F.logsigmoid(-beta * h_l)
        elif kind == "robust":
            z = beta * delta
            term = (-(1 - epsilon) * F.logsigmoid(z) + epsilon * F.logsigmoid(-z)) / (1 - 2 * epsilon)
        elif kind == "bco_pair":
            term = -F.logsigmoid(beta * h_w) - F.logsigmoid(-beta * h_l)
        elif kind == "sppo_hard":
            term = (h_w - 0.5 / beta) ** 2 + (h_l + 0.5 / beta) ** 2
        elif kind == "aot":
            policy = torch.sort(logp_w - logp_l).values
            reference = torch.sort(ref_w - ref_l).values if ref_w is not None and ref_l is not None else 0.0
            term = _smoothed_sigmoid(beta * (policy - reference), epsilon)
        elif kind == "aot_unpaired":
            term = _smoothed_sigmoid(beta * (torch.sort(h_w).values - torch.sort(h_l).values), epsilon)
        elif kind == "apo_zero":
            term = 1 - torch.sigmoid(beta * h_w) + torch.sigmoid(beta * h_l)
        elif kind == "apo_down":
            term = torch.sigmoid(beta * h_w) + 1 - torch.sigmoid(beta * (h_w - h_l))
        elif kind == "discopop":
            z = beta * delta
            modulation = torch.sigmoid(z / tau)
            term = -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
        elif kind == "sft":
            term = _token_mean_nll(logp_w, tokens_w).expand(pairs)
        elif kind == "sigmoid_norm":
            term = -F.logsigmoid(beta * (s_w / count_w - s_l / count_l))
        elif kind == "simpo":
            mean_w, mean_l = logp_w / count_w, logp_l / count_l
            term = _smoothed_sigmoid(beta * (mean_w - mean_l - gamma / beta), epsilon)
            rewards_w, rewards_l = beta * mean_w.detach(), beta * mean_l.detach()
        else:  # orpo
            # the per-token mean log-probability is ≤ 0; at 0 (a certain completion) its odds are infinite, so
            # keep it a hair below to leave the gradient finite
            tiny = torch.finfo(dtype).tiny
            mean_w, mean_l = (logp_w / count_w).clamp(max=-tiny), (logp_l / count_l).clamp(max=-tiny)
            odds = (mean_w - mean_l) - (_log1mexp(mean_w) - _log1mexp(mean_l))
            term = -beta * F.logsigmoid(odds)
            log_odds = odds.detach()
            rewards_w, rewards_l = beta * mean_w.detach(), beta * mean_l.detach()
        per_pair = per_pair + weight * term
    if weights is not None:
        per_pair = per_pair * weights.to(dtype)

    total = safe_divide(per_pair.sum(), torch.tensor(pairs[0], dtype=dtype, device=chosen.device))
    nll = None
    if nll_alpha:
        nll = nll_loss.to(dtype) if nll_loss is not None else _token_mean_nll(logp_w, tokens_w)
        total = total + nll_alpha * nll
    out = result_dtype(chosen)
    margins = rewards_w - rewards_l
    return PreferenceLoss(
        loss=total.to(out),
        per_pair_loss=per_pair.to(out),
        chosen_rewards=rewards_w.to(out),
        rejected_rewards=rewards_l.to(out),
        reward_margins=margins.to(out),
        reward_accuracies=(rewards_w > rewards_l).to(out),
        nll_loss=None if nll is None else nll.to(out),
        log_odds=None if log_odds is None else log_odds.to(out),
    )


def kto_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl_log_probs: torch.Tensor | None = None,
    ref_kl_log_probs: torch.Tensor | None = None,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    r"""KTO: a loss of unpaired completions, each desirable or undesirable, from per-sequence log-probabilities.

    With the log-ratio :math:`h = \log\pi_\theta(y) - \log\pi_{ref}(y)` of each completion and the KL estimate
    :math:`z = \max\bigl(0, \operatorname{mean}_j(\log\pi_\theta(y'_j) - \log\pi_{ref}(y'_j))\bigr)` over mismatched
    pairs (each prompt with another example's completion, ``KTOTrainer``'s ``KL_*`` batch), not differentiated:

    .. math::
        \ell = \begin{cases}
            \lambda_D\, (1 - \sigma(\beta (h - z))) & \text{desirable} \\
            \lambda_U\, (1 - \sigma(\beta (z - h))) & \text{undesirable}
        \end{cases} \qquad
        \texttt{apo\_zero\_unpaired}: \begin{cases}
            \lambda_D\, (1 - \sigma(\beta h)) & \text{desirable} \\
            \lambda_U\, \sigma(\beta h) & \text{undesirable}
        \end{cases}

    and the loss is the mean over the examples — ``KTOTrainer``'s definitions. A function of its own rather than a
    ``loss_type`` of :func:`preference_loss`: its examples are not pairs (any number of each kind, a label each) and
    it reads a third set of log-probabilities, the mismatched pairs'. TRL averages the KL estimate over processes;
    here it is the local batch's (pass ``kl_log_probs`` and ``ref_kl_log_probs`` gathered from every
    process to reproduce TRL's, which averages per-process means: the same with equal batches).

    Args:
        log_probs: ``(B,)`` summed log-probabilities of the completions under the policy.
        ref_log_probs: ``(B,)`` the same under the reference model.
        labels: ``(B,)`` bool (or 0/1 integers): True for a desirable completion.
        kl_log_probs, ref_kl_log_probs: ``(M,)`` summed log-probabilities of the mismatched completions under the
            policy (computed under ``torch.no_grad()`` in TRL; detached here either way) and the reference. Required
            for ``"kto"``, refused for ``"apo_zero_unpaired"``.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"`` (APO-zero for unpaired data, no KL).
        beta: β > 0.
        desirable_weight, undesirable_weight: :math:`\lambda_D, \lambda_U \ge 0`, to balance unequal numbers of each.

    Returns:
        :class:`KTOLoss`: ``loss``, ``per_example_loss``, ``rewards``, ``reward_margin`` and ``kl``.

    References:
        Ethayarajh et al. KTO: Model Alignment as Prospect Theoretic Optimization (2024). D'Oosterlinck et al.
        Anchored Preference Optimization (2024).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(
            f"loss_type must be one of {', '.join(map(repr, KTO_LOSS_TYPES))}, got {checks.shown(loss_type)}"
        )
    policy = checks.check_floating("log_probs", log_probs)
    if policy.dim() != 1:
        raise ValueError(
            f"log_probs has shape {checks.shape_str(policy.shape)}; expected (B,), one summed log-probability per "
            "completion"
        )
    examples = policy.shape
    reference = _check_like("ref_log_probs", ref_log_probs, examples)
    desirable = _check_labels(labels, examples)
    beta = checks.check_in_range("beta", beta, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
    weight_d = checks.check_in_range("desirable_weight", desirable_weight, 0.0)
    weight_u = checks.check_in_range("undesirable_weight", undesirable_weight, 0.0)
    dtype = accumulation_dtype(policy.dtype)
    device = policy.device
    kl = torch.zeros((), dtype=dtype, device=device)
    if loss_type == "kto":
        if kl_log_probs is None or ref_kl_log_probs is None:
            missing = "kl_log_probs" if kl_log_probs is None else "ref_kl_log_probs"
            raise ValueError(
                f"loss_type='kto' needs kl_log_probs and ref_kl_log_probs (its KL estimate); {missing} is missing"
            )
        kl_policy = checks.check_floating("kl_log_probs", kl_log_probs)
        if kl_policy.dim() != 1:
            raise ValueError(f"kl_log_probs has shape {checks.shape_str(kl_policy.shape)}; expected (M,)")
        kl_reference = _check_like("ref_kl_log_probs", ref_kl_log_probs, kl_policy.shape)
        difference = (kl_policy.detach().to(dtype) - kl_reference.detach().to(dtype)).sum()
        kl = safe_divide(difference, torch.tensor(kl_policy.shape[0], dtype=dtype, device=device)).clamp(min=0)
    elif kl_log_probs is not None or ref_kl_log_probs is not None:
        raise ValueError("loss_type='apo_zero_unpaired' has no KL term; drop kl_log_probs and ref_kl_log_probs")

    h = policy.to(dtype) - reference.to(dtype)
    if loss_type == "kto":
        good, bad = 1 - torch.sigmoid(beta * (h - kl)), 1 - torch.sigmoid(beta * (kl - h))
    else:
        good, bad = 1 - torch.sigmoid(beta * h), torch.sigmoid(beta * h)
    per_example = torch.where(desirable, weight_d * good, weight_u * bad)
    count = torch.tensor(examples[0], dtype=dtype, device=device)
    rewards = beta * h.detach()
    n_desirable = desirable.sum().to(dtype)
    mean_d = safe_divide(torch.where(desirable, rewards, 0.0).sum(), n_desirable)
    mean_u = safe_divide(torch.where(desirable, 0.0, rewards).sum(), count - n_desirable)
    both = (n_desirable > 0) & (n_desirable < count)
    out = result_dtype(policy)
    return KTOLoss(
        loss=safe_divide(per_example.sum(), count).to(out),
        per_example_loss=per_example.to(out),
        rewards=rewards.to(out),
        reward_margin=torch.where(both, mean_d - mean_u, 0.0).to(out),
        kl=kl.to(out),
    )


def wpo_weights(log_probs: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""WPO's weight of each sequence, :math:`\exp\bigl(\frac{1}{|y|}\sum_t (\log p_t - \log\sum_v p_{t,v}^2)\bigr)`:
    the policy's length-normalised probability of the sequence, each token's aligned to the distribution's own
    typical probability (Zhou et al., WPO, Eq. 2; ``DPOTrainer``'s ``use_weighting``). Not differentiated, as TRL.

    Args:
        log_probs: ``(B, T)`` per-token log-probabilities of the sampled tokens.
        log_sum_sq_probs: ``(B, T)`` per-token :math:`\log\sum_v p_v^2` (TRL's fused head gives it).
        mask: ``(B, T)`` the completion's tokens (bool or 0/1); a sequence without any has weight 1.

    Returns:
        ``(B,)``: multiply the chosen completions' by the rejected completions' and pass it as ``weights`` to
        :func:`preference_loss`.
    """
    tokens = checks.check_floating("log_probs", log_probs)
    if tokens.dim() != 2:
        raise ValueError(f"log_probs has shape {checks.shape_str(tokens.shape)}; expected (B, T) per-token values")
    squares = _check_like("log_sum_sq_probs", log_sum_sq_probs, tokens.shape)
    mask = checks.check_tensor("mask", mask)
    if mask.shape != tokens.shape:
        raise ValueError(
            f"mask has shape {checks.shape_str(mask.shape)} but log_probs has shape {checks.shape_str(tokens.shape)}; "
            "they must be equal"
        )
    dtype = accumulation_dtype(tokens.dtype)
    with torch.no_grad():
        kept = mask.to(dtype)
        aligned = torch.where(kept > 0, tokens.to(dtype) - squares.to(dtype), 0.0) * kept
        return torch.exp(aligned.sum(1) / kept.sum(1).clamp(min=1.0)).to(tokens.dtype)


def _scores(log_ratio: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """``f'(π/π_ref)`` of the f-divergence, of the log-ratio (f-DPO, TRL's definitions)."""
    if divergence == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if divergence == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        # TRL clamps the exponent at 80 (float32/bfloat16) so that exp stays representable
        return (torch.exp(((alpha - 1.0) * log_ratio).clamp(max=80.0)) - 1.0) / (alpha - 1.0)
    return log_ratio


def _smoothed_sigmoid(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``−(1 − ε) log σ(z) − ε log σ(−z)``: the logistic loss with labels flipped with probability ε."""
    loss = -F.logsigmoid(z)
    return loss if epsilon == 0 else (1 - epsilon) * loss - epsilon * F.logsigmoid(-z)


def _token_mean_nll(log_probs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``−Σ log π / Σ |y|``: the NLL averaged over every token of the batch (0 when there is none)."""
    return safe_divide(-log_probs.sum(), lengths.to(log_probs.dtype).sum())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − eˣ)`` for x < 0 without cancellation: ``log(−expm1 x)`` near 0, ``log1p(−eˣ)`` below −log 2
    (Mächler, 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _check_loss_types(loss_type: object) -> tuple[str, ...]:
    types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(types, Sequence) or len(types) == 0:
        raise ValueError(
            f"loss_type must be a loss type or a non-empty sequence of them, got {checks.shown(loss_type)}"
        )
    for kind in types:
        if kind not in PREFERENCE_LOSS_TYPES:
            options = ", ".join(map(repr, PREFERENCE_LOSS_TYPES))
            raise ValueError(f"loss_type must be one of {options} (or a sequence of them), got {checks.shown(kind)}")
    if len(types) > 1 and set(types) & set(_STANDALONE):
        raise ValueError(f"loss_type 'simpo' and 'orpo' are methods of their own, not combined; got {list(types)}")
    return tuple(str(kind) for kind in types)


def _check_loss_weights(loss_weights: object, types: tuple[str, ...]) -> tuple[float, ...]:
    if loss_weights is None:
        return (1.0,) * len(types)
    if isinstance(loss_weights, str) or not isinstance(loss_weights, Sequence) or len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights must hold one number per loss type ({len(types)}: {list(types)}), "
            f"got {checks.shown(loss_weights) if not isinstance(loss_weights, Sequence) else list(loss_weights)}"
        )
    return tuple(checks.check_number("loss_weights", weight) for weight in loss_weights)


def _check_label_smoothing(label_smoothing: object, types: tuple[str, ...]) -> float:
    epsilon = checks.check_number("label_smoothing", label_smoothing)
    readers = [kind for kind in types if kind in _SMOOTHING]
    if epsilon != 0 and not readers:
        raise ValueError(
            f"label_smoothing is defined by loss types {', '.join(_SMOOTHING)} only, got label_smoothing={epsilon:g} "
            f"with loss_type {list(types) if len(types) > 1 else types[0]!r}"
        )
    for kind in readers:
        low, high, low_inclusive, high_inclusive = _SMOOTHING[kind]
        if not (
            (epsilon >= low if low_inclusive else epsilon > low)
            and (epsilon <= high if high_inclusive else epsilon < high)
        ):
            interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
            hint = "; the EXO paper recommends 1e-3" if kind == "exo_pair" else ""
            raise ValueError(f"label_smoothing must be in {interval} for loss_type {kind!r}, got {epsilon:g}{hint}")
    return epsilon


def _check_like(name: str, tensor: object, shape: torch.Size) -> torch.Tensor:
    tensor = checks.check_floating(name, tensor)
    if tensor.shape != shape:
        raise ValueError(f"{name} has shape {checks.shape_str(tensor.shape)}; expected {checks.shape_str(shape)}")
    return tensor


def _check_lengths(
    name: str, lengths: object, shape: torch.Size, needed: object, types: tuple[str, ...]
) -> torch.Tensor | None:
    if lengths is None:
        if needed:
            raise ValueError(
                f"{name} is missing: loss_type {list(types) if len(types) > 1 else types[0]!r} (or the NLL term) "
                "averages the log-probabilities over each completion's tokens; pass the token counts, shape "
                f"{checks.shape_str(shape)}"
            )
        return None
    lengths = checks.check_tensor(name, lengths)
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{name} must hold token counts (integer or floating), got dtype {lengths.dtype}")
    if lengths.shape != shape:
        raise ValueError(
            f"{name} has shape {checks.shape_str(lengths.shape)}; expected {checks.shape_str(shape)}, one token "
            "count per completion"
        )
    checks.check_non_negative(name, lengths)
    return lengths


def _check_labels(labels: object, shape: torch.Size) -> torch.Tensor:
    labels = checks.check_tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be bool (True: desirable) or 0/1 integers, got dtype {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels has shape {checks.shape_str(labels.shape)}; expected {checks.shape_str(shape)}")
    if labels.dtype != torch.bool:
        from xent._config import value_checks_enabled

        if value_checks_enabled(labels) and labels.numel() and bool(((labels != 0) & (labels != 1)).any()):
            raise ValueError(f"labels must be 0 or 1 (or bool), found {int(labels[(labels != 0) & (labels != 1)][0])}")
        labels = labels != 0
    return labels
