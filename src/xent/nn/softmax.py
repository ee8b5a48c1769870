"""The modules of the softmax losses (:mod:`xent.nn`): cross-entropy and its variants for imbalanced classes, noisy
labels and distillation — :class:`CrossEntropyLoss`, :class:`FocalLoss`, :class:`Poly1CrossEntropyLoss`,
:class:`LogitAdjustedCrossEntropyLoss`, :class:`BalancedSoftmaxCrossEntropyLoss`, :class:`LDAMLoss`,
:class:`GeneralizedCrossEntropyLoss`, :class:`SymmetricCrossEntropyLoss` and :class:`DistillationLoss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xent import losses
from xent.losses import checks
from xent.losses.distill import check_distillation_options
from xent.losses.softmax import check_softmax_options
from xent.losses.teachers import check_divergence, check_tail
from xent.nn.base import _Loss


class CrossEntropyLoss(_Loss):
    """Module form of :func:`xent.cross_entropy`; see there for the formula, shapes and options.

    Shape:
        - Input: ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        - Target: class indices ``()``, ``(N)`` or ``(N, d1, ..., dK)``, or probabilities of the input's shape.
        - Output: ``()``, or the target's batch shape with ``reduction="none"``.

    Example:
        >>> loss_fn = xent.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> loss = loss_fn(torch.randn(8, 5, requires_grad=True), torch.randint(5, (8,)))
        >>> loss.backward()
    """

    function = staticmethod(losses.cross_entropy)

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        label_smoothing, z_loss, softcap = check_softmax_options(
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            ignore_index=ignore_index,
        )
        super().__init__(
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )


class FocalLoss(_Loss):
    """Module form of :func:`xent.focal_loss` (softmax focal loss, Lin et al., 2017)."""

    function = staticmethod(losses.focal_loss)
    tensor_options = ("weight", "alpha")

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(gamma=gamma, alpha=alpha, weight=weight, ignore_index=ignore_index, reduction=reduction)


class Poly1CrossEntropyLoss(_Loss):
    """Module form of :func:`xent.poly1_cross_entropy` (Leng et al., 2022)."""

    function = staticmethod(losses.poly1_cross_entropy)

    def __init__(
        self,
        epsilon: float = 1.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            epsilon=epsilon,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )


class LogitAdjustedCrossEntropyLoss(_Loss):
    """Module form of :func:`xent.logit_adjusted_cross_entropy` (Menon et al., 2021)."""

    function = staticmethod(losses.logit_adjusted_cross_entropy)
    tensor_options = ("weight", "class_counts")

    def __init__(
        self,
        class_counts: torch.Tensor | Sequence[float],
        tau: float = 1.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            class_counts=class_counts,
            tau=tau,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )


class BalancedSoftmaxCrossEntropyLoss(_Loss):
    """Module form of :func:`xent.balanced_softmax_cross_entropy` (Ren et al., 2020)."""

    function = staticmethod(losses.balanced_softmax_cross_entropy)
    tensor_options = ("weight", "class_counts")

    def __init__(
        self,
        class_counts: torch.Tensor | Sequence[float],
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            class_counts=class_counts,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )


class LDAMLoss(_Loss):
    """Module form of :func:`xent.ldam_loss` (Cao et al., 2019). For LDAM-DRW, assign ``module.weight`` from
    :func:`xent.deferred_reweighting` at the start of each epoch."""

    function = staticmethod(losses.ldam_loss)
    tensor_options = ("weight", "class_counts")

    def __init__(
        self,
        class_counts: torch.Tensor | Sequence[float],
        max_margin: float = 0.5,
        scale: float = 30.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            class_counts=class_counts,
            max_margin=max_margin,
            scale=scale,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
        )


class GeneralizedCrossEntropyLoss(_Loss):
    """Module form of :func:`xent.generalized_cross_entropy` (Zhang & Sabuncu, 2018)."""

    function = staticmethod(losses.generalized_cross_entropy)

    def __init__(
        self, q: float = 0.7, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean"
    ) -> None:
        super().__init__(q=q, weight=weight, ignore_index=ignore_index, reduction=reduction)


class SymmetricCrossEntropyLoss(_Loss):
    """Module form of :func:`xent.symmetric_cross_entropy` (Wang et al., 2019)."""

    function = staticmethod(losses.symmetric_cross_entropy)

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 1.0,
        log_zero: float = -4.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            alpha=alpha, beta=beta, log_zero=log_zero, weight=weight, ignore_index=ignore_index, reduction=reduction
        )


class DistillationLoss(_Loss):
    """Module form of :func:`xent.distillation_loss`: ``forward(student_logits, teacher=None, *, target=None,
    teacher_indices=None, teacher_log_probs=None, num_items_in_batch=None)``, the options stored at construction."""

    function = staticmethod(losses.distillation_loss)

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        teacher_is_probs: bool = False,
        *,
        divergence: str = "forward_kl",
        beta: float | None = None,
        top_k_tail: str = "renormalize",
        hard_weight: float = 1.0,
        ignore_index: int = -100,
    ):
        temperature = check_distillation_options(temperature=temperature, reduction=reduction)
        checked_beta = check_divergence(divergence, beta)
        options: dict[str, object] = dict(
            temperature=temperature,
            reduction=reduction,
            teacher_is_probs=teacher_is_probs,
            divergence=divergence,
            beta=None if beta is None else checked_beta,
            top_k_tail=check_tail(top_k_tail),
            hard_weight=checks.check_in_range("hard_weight", hard_weight, 0.0),
            ignore_index=checks.check_ignore_index(ignore_index),
        )
        super().__init__(**options)

    def forward(  # type: ignore[override]  # the teacher and the per-batch tensors are keyword arguments
        self,
        student_logits: torch.Tensor,
        teacher: torch.Tensor | None = None,
        *,
        target: torch.Tensor | None = None,
        teacher_indices: torch.Tensor | None = None,
        teacher_log_probs: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        options = {name: getattr(self, name) for name in self._option_names}
        return losses.distillation_loss(
            student_logits,
            teacher,
            target=target,
            teacher_indices=teacher_indices,
            teacher_log_probs=teacher_log_probs,
            num_items_in_batch=num_items_in_batch,
            **options,
        )
