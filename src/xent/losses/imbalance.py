"""Losses for long-tailed (class-imbalanced) data: class-balanced weights, logit adjustment, balanced softmax, LDAM.

All of them take the training split's per-class sample counts ``class_counts`` (shape ``(C,)``), positive: a
log-prior, an effective number or a margin of a class with no sample is undefined, so a zero count is an error (one
rule, :func:`check_class_counts`), never a silent weight of 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from xent.core.autocast import float32_under_autocast
from xent.core.reduce import accumulation_dtype
from xent.core.rowloss import RowLoss
from xent.kernels.dispatch import Impl
from xent.losses import checks
from xent.losses.softmax import class_dimension, cross_entropy, fused_index_loss


def check_class_counts(class_counts: torch.Tensor | Sequence[float], *, num_classes: int | None = None) -> torch.Tensor:
    """Per-class sample counts as a float64 tensor ``(C,)``; a zero, negative or non-finite count is rejected."""
    try:
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        shown = type(class_counts).__name__
        raise TypeError(f"class_counts must be a tensor or a sequence of numbers, got {shown}") from None
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"class_counts must have shape (C,), one count per class, got shape {checks.shape_str(counts.shape)}"
        )
    if num_classes is not None and counts.numel() != num_classes:
        raise ValueError(
            f"class_counts has {counts.numel()} entries but input has {num_classes} classes; expected shape "
            f"({num_classes},)"
        )
    bad = ~((counts > 0) & torch.isfinite(counts))  # also catches NaN
    if not torch.compiler.is_compiling() and bool(bad.any()):  # a host read: eager only (xent._config's rule)
        index = int(bad.nonzero()[0])
        raise ValueError(f"class_counts must be positive and finite, got {counts[index].item():g} for class {index}")
    return counts


def class_balanced_weights(class_counts: torch.Tensor | Sequence[float], beta: float = 0.9999) -> torch.Tensor:
    r"""Per-class weights from the effective number of samples.

    .. math::
        w_c \propto \frac{1 - \beta}{1 - \beta^{n_c}}, \qquad \sum_c w_c = C

    :math:`\beta = 0` gives all ones (no re-weighting); :math:`\beta \to 1` approaches inverse class frequency.
    Pass the result as ``weight=`` to any loss.

    Args:
        class_counts: samples per class ``(C,)``, positive.
        beta: :math:`\beta \in [0, 1)`; default 0.9999 (the paper's choice for long-tailed CIFAR).

    Returns:
        ``(C,)`` float32 weights summing to C.

    References:
        Cui, Jia, Lin, Song, Belongie. Class-Balanced Loss Based on Effective Number of Samples. CVPR 2019.
    """
    beta = checks.check_in_range("beta", beta, 0.0, 1.0, high_inclusive=False)
    counts = check_class_counts(class_counts)
    # 1 - β^n = -expm1(n log β): exact for β close to 1, where 1 - β^n suffers cancellation. β = 0 gives
    # log β = -inf and an effective number of 1 for every (positive) count.
    effective_number = -torch.expm1(counts * torch.log(torch.tensor(beta, dtype=torch.float64)))
    weights = (1.0 - beta) / effective_number.clamp_min(1e-300)
    weights = weights * counts.numel() / weights.sum()
    return weights.float()


def deferred_reweighting(
    class_counts: torch.Tensor | Sequence[float], epoch: int, *, start_epoch: int, beta: float = 0.9999
) -> torch.Tensor:
    """Deferred re-weighting (DRW): all-ones weights before ``start_epoch``, class-balanced weights from it on.

    Train with plain (or LDAM) loss first to learn features, then re-weight to fix the classifier's bias. The paper
    switches at 80% of training (epoch 160 of 200).

    Args:
        class_counts: samples per class ``(C,)``, positive (checked before ``start_epoch`` too).
        epoch: the current epoch (0-based).
        start_epoch: first epoch with class-balanced weights.
        beta: see :func:`class_balanced_weights`; the paper uses 0.9999.

    Returns:
        ``(C,)`` float32 weights for ``weight=``.

    References:
        Cao, Wei, Gaidon, Arechiga, Ma. Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss.
        NeurIPS 2019.
    """
    counts = check_class_counts(class_counts)
    if epoch < start_epoch:
        return torch.ones(counts.numel())
    return class_balanced_weights(counts, beta)


def _log_prior_offset(
    input: torch.Tensor, class_counts: torch.Tensor | Sequence[float], tau: float, name: str = "input"
) -> torch.Tensor:
    """τ · log π_c shaped to broadcast along the class dimension of ``input`` (the caller's argument ``name``)."""
    class_dim = class_dimension(input, name)
    counts = check_class_counts(class_counts, num_classes=input.shape[class_dim])
    log_prior = torch.log(counts / counts.sum())
    return (tau * log_prior).to(device=input.device).view((-1,) + (1,) * (input.dim() - class_dim - 1))


def logit_adjust(logits: torch.Tensor, class_counts: torch.Tensor | Sequence[float], tau: float = 1.0) -> torch.Tensor:
    r"""Post-hoc logit adjustment: :math:`x - \tau \log \pi`, with :math:`\pi` the training label distribution.

    Apply it to a model trained with plain cross-entropy to predict well on balanced test data.

    Args:
        logits: ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        class_counts: training samples per class ``(C,)``, positive.
        tau: :math:`\tau \ge 0`; default 1 (Bayes-optimal for the balanced error).

    Returns:
        Adjusted logits, same shape and dtype.

    References:
        Menon, Jayasumana, Rawat, Jain, Veit, Kumar. Long-tail learning via logit adjustment. ICLR 2021.
    """
    tau = checks.check_in_range("tau", tau, 0.0)
    return logits - _log_prior_offset(logits, class_counts, tau, "logits").to(logits.dtype)


@float32_under_autocast
def logit_adjusted_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    class_counts: torch.Tensor | Sequence[float],
    tau: float = 1.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    token_weight: torch.Tensor | None = None,
    impl: Impl | None = None,
) -> torch.Tensor:
    r"""Logit-adjusted cross-entropy: cross-entropy on :math:`x + \tau \log \pi`.

    .. math::
        \ell_n = -\log \frac{e^{x_{n,y_n} + \tau \log \pi_{y_n}}}{\sum_c e^{x_{n,c} + \tau \log \pi_c}}

    Training with the prior added makes the raw logits :math:`x` calibrated for a balanced label distribution; no
    post-hoc correction is needed at test time. :math:`\tau = 0` is plain cross-entropy.

    Args:
        class_counts: training samples per class ``(C,)``, positive; :math:`\pi = n / \sum n`.
        tau: :math:`\tau \ge 0`; default 1.
        weight, ignore_index, reduction, label_smoothing: as in :func:`xent.cross_entropy`.
        token_weight: per-element weights with the target's shape, as in :func:`xent.cross_entropy`.
        impl: ``None`` (automatic: the fused kernel for training-sized problems), ``"reference"`` (this function's
            plain definition), ``"chunked"`` or ``"triton"``, as in :func:`xent.cross_entropy`.

    References:
        Menon, Jayasumana, Rawat, Jain, Veit, Kumar. Long-tail learning via logit adjustment. ICLR 2021.
    """
    tau = checks.check_in_range("tau", tau, 0.0)
    class_dim = class_dimension(input)
    description = describe_logit_adjusted(
        input.shape[class_dim], class_counts=class_counts, tau=tau, label_smoothing=label_smoothing
    )
    label_smoothing = description.label_smoothing
    offset = _log_prior_offset(input, class_counts, tau)  # (C, 1, ..., 1)
    options: dict[str, Any] = {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "token_weight": token_weight,
    }

    def readable() -> torch.Tensor:
        # The offset is added in float32 for half inputs, as the kernels add it: x + τ log π rounded to half
        # precision would shift the logits by up to half a unit in their last place.
        logits = input.to(accumulation_dtype(input.dtype))
        adjusted = logits + offset.to(logits.dtype)
        loss = cross_entropy(adjusted, target, label_smoothing=label_smoothing, impl="reference", **options)
        return loss.to(input.dtype)

    return fused_index_loss(
        "logit_adjusted_cross_entropy",
        input,
        target,
        readable,
        impl=impl,
        description=description,
        **options,
    )


def describe_logit_adjusted(
    num_classes: int, *, class_counts: torch.Tensor | Sequence[float], tau: float = 1.0, label_smoothing: float = 0.0
) -> RowLoss:
    """The row-loss description of :func:`logit_adjusted_cross_entropy`: the offset τ log π of every class."""
    tau = checks.check_in_range("tau", tau, 0.0)
    counts = check_class_counts(class_counts, num_classes=num_classes)
    return RowLoss(
        class_offset=tau * torch.log(counts / counts.sum()),
        label_smoothing=checks.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0),
    )


def describe_balanced_softmax(
    num_classes: int, *, class_counts: torch.Tensor | Sequence[float], label_smoothing: float = 0.0
) -> RowLoss:
    """The row-loss description of :func:`balanced_softmax_cross_entropy`."""
    return describe_logit_adjusted(num_classes, class_counts=class_counts, tau=1.0, label_smoothing=label_smoothing)


@float32_under_autocast
def balanced_softmax_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    class_counts: torch.Tensor | Sequence[float],
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    token_weight: torch.Tensor | None = None,
    impl: Impl | None = None,
) -> torch.Tensor:
    r"""Balanced softmax cross-entropy: cross-entropy on :math:`x + \log n`.

    .. math::
        \ell_n = -\log \frac{n_{y_n} e^{x_{n,y_n}}}{\sum_c n_c e^{x_{n,c}}}

    The softmax is re-weighted by the class counts during training, compensating the label-distribution shift
    between a long-tailed training set and a balanced test set. Equal to
    :func:`logit_adjusted_cross_entropy` with :math:`\tau = 1` (:math:`\log n` and :math:`\log \pi` differ by a
    constant, which the softmax ignores).

    Args:
        class_counts: training samples per class ``(C,)``, positive.
        weight, ignore_index, reduction, label_smoothing: as in :func:`xent.cross_entropy`.
        token_weight: per-element weights with the target's shape, as in :func:`xent.cross_entropy`.
        impl: ``None`` (automatic: the fused kernel for training-sized problems), ``"reference"`` (this function's
            plain definition), ``"chunked"`` or ``"triton"``, as in :func:`xent.cross_entropy`.

    References:
        Ren, Yu, Sheng, Ma, Zhao, Yi, Li. Balanced Meta-Softmax for Long-Tailed Visual Recognition. NeurIPS 2020.
    """
    return logit_adjusted_cross_entropy(
        input,
        target,
        class_counts=class_counts,
        tau=1.0,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        token_weight=token_weight,
        impl=impl,
    )


def ldam_margins(class_counts: torch.Tensor | Sequence[float], max_margin: float = 0.5) -> torch.Tensor:
    r"""LDAM's per-class margins :math:`m_c \propto n_c^{-1/4}`, scaled so that the largest is ``max_margin``.

    Returns:
        ``(C,)`` float64 margins; :func:`ldam_loss` casts them to the logits' dtype.
    """
    max_margin = checks.check_in_range("max_margin", max_margin, 0.0)
    counts = check_class_counts(class_counts)
    margins = counts.pow(-0.25)
    return margins * (max_margin / margins.max())


@float32_under_autocast
def ldam_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    class_counts: torch.Tensor | Sequence[float],
    max_margin: float = 0.5,
    scale: float = 30.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weight: torch.Tensor | None = None,
    impl: Impl | None = None,
) -> torch.Tensor:
    r"""Label-distribution-aware margin (LDAM) loss: cross-entropy with a larger margin for rarer classes.

    .. math::
        \ell_n = \operatorname{CE}\bigl(s\,(x_n - m_{y_n} \mathbb{1}_{y_n}),\ y_n\bigr), \qquad
        m_c = \frac{M}{\max_k n_k^{-1/4}}\, n_c^{-1/4}

    The target's logit is lowered by its class margin before the softmax, so rare classes must win by more. The
    logits are meant to be cosine similarities (a normalised linear head), hence the scale :math:`s`. Combine it
    with :func:`deferred_reweighting` for the paper's LDAM-DRW.

    Args:
        class_counts: training samples per class ``(C,)``, positive.
        max_margin: :math:`M \ge 0`, the largest margin; default 0.5 (the paper's).
        scale: :math:`s > 0`; default 30 (the paper's).
        weight, ignore_index, reduction: as in :func:`xent.cross_entropy`.
        token_weight: per-element weights with the target's shape, as in :func:`xent.cross_entropy`.
        impl: ``None`` (automatic: the fused kernel for training-sized problems), ``"reference"`` (this function's
            plain definition), ``"chunked"`` or ``"triton"``, as in :func:`xent.cross_entropy`.

    References:
        Cao, Wei, Gaidon, Arechiga, Ma. Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss.
        NeurIPS 2019.
    """
    class_dim = class_dimension(input)
    description = describe_ldam(input.shape[class_dim], class_counts=class_counts, max_margin=max_margin, scale=scale)
    margins, scale = cast(torch.Tensor, description.target_margin), description.logit_scale
    options: dict[str, Any] = {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "token_weight": token_weight,
    }

    def readable() -> torch.Tensor:
        # Out-of-range indices only reach here with value checks off; clamping keeps the scatter in bounds and
        # cross_entropy below reports them as PyTorch would.
        safe_target = torch.where(target == ignore_index, torch.zeros_like(target), target)
        safe_target = safe_target.clamp(0, margins.numel() - 1)
        # s (x − m) in float32 for half inputs, as the kernels form it: rounded to half precision, the scaled logits
        # would be off by s times the inputs' rounding (0.08 at s = 30 and x ≈ 6).
        logits = input.to(accumulation_dtype(input.dtype))
        margin_of_target = margins.to(device=input.device, dtype=logits.dtype)[safe_target].unsqueeze(class_dim)
        offset = torch.zeros_like(logits).scatter(class_dim, safe_target.unsqueeze(class_dim), margin_of_target)
        return cross_entropy(scale * (logits - offset), target, impl="reference", **options).to(input.dtype)

    return fused_index_loss(
        "ldam_loss",
        input,
        target,
        readable,
        impl=impl,
        description=description,
        **options,
    )


def describe_ldam(
    num_classes: int, *, class_counts: torch.Tensor | Sequence[float], max_margin: float = 0.5, scale: float = 30.0
) -> RowLoss:
    """The row-loss description of :func:`ldam_loss`: the margin of every class and the scale."""
    counts = check_class_counts(class_counts, num_classes=num_classes)
    return RowLoss(
        target_margin=ldam_margins(counts, max_margin),
        logit_scale=checks.check_in_range("scale", scale, 0.0, low_inclusive=False),
    )
