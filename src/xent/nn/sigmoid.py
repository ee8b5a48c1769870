"""The modules of the binary and multi-label losses (:mod:`xent.nn`): :class:`BCEWithLogitsLoss`, :class:`BCELoss`
and :class:`SigmoidFocalLoss`."""

from __future__ import annotations

import torch

from xent import losses
from xent.losses.focal import check_sigmoid_focal_options
from xent.losses.sigmoid import check_binary_options
from xent.nn.base import _Loss


class BCEWithLogitsLoss(_Loss):
    """Module form of :func:`xent.binary_cross_entropy_with_logits`; see there for the formula and options.

    Shape:
        - Input: any shape. Target: the input's shape. Output: ``()``, or the input's shape with ``"none"``.
    """

    function = staticmethod(losses.binary_cross_entropy_with_logits)
    tensor_options = ("weight", "pos_weight")

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        pos_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        label_smoothing = check_binary_options(reduction=reduction, label_smoothing=label_smoothing)
        super().__init__(weight=weight, pos_weight=pos_weight, reduction=reduction, label_smoothing=label_smoothing)


class BCELoss(_Loss):
    """Module form of :func:`xent.binary_cross_entropy` (input: probabilities). Prefer :class:`BCEWithLogitsLoss`.

    Shape:
        - Input: any shape. Target: the input's shape. Output: ``()``, or the input's shape with ``"none"``.
    """

    function = staticmethod(losses.binary_cross_entropy)

    def __init__(self, weight: torch.Tensor | None = None, reduction: str = "mean", label_smoothing: float = 0.0):
        label_smoothing = check_binary_options(reduction=reduction, label_smoothing=label_smoothing)
        super().__init__(weight=weight, reduction=reduction, label_smoothing=label_smoothing)


class SigmoidFocalLoss(_Loss):
    """Module form of :func:`xent.sigmoid_focal_loss` (binary / multi-label focal loss, Lin et al., 2017)."""

    function = staticmethod(losses.sigmoid_focal_loss)

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25, reduction: str = "mean") -> None:
        gamma, alpha = check_sigmoid_focal_options(gamma=gamma, alpha=alpha, reduction=reduction)
        super().__init__(gamma=gamma, alpha=alpha, reduction=reduction)
