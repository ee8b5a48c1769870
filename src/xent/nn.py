"""One :class:`torch.nn.Module` per functional loss: the constructor stores the options, ``forward`` is one call."""

from __future__ import annotations

import torch

from xent import losses
from xent.losses import sigmoid, softmax


class _Loss(torch.nn.Module):
    """Stores ``reduction`` and renders the options in ``repr``."""

    _repr_fields: tuple[str, ...] = ()

    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.reduction = reduction

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in ("reduction", *self._repr_fields))


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

    _repr_fields = ("ignore_index", "label_smoothing", "z_loss", "softcap")

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        super().__init__(reduction)
        self.label_smoothing, self.z_loss, self.softcap = softmax.check_softmax_options(
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            ignore_index=ignore_index,
        )
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return losses.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )


class BCEWithLogitsLoss(_Loss):
    """Module form of :func:`xent.binary_cross_entropy_with_logits`; see there for the formula and options.

    Shape:
        - Input: any shape. Target: the input's shape. Output: ``()``, or the input's shape with ``"none"``.
    """

    _repr_fields = ("label_smoothing",)

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        pos_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(reduction)
        self.label_smoothing = sigmoid.check_binary_options(reduction=reduction, label_smoothing=label_smoothing)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return losses.binary_cross_entropy_with_logits(
            input,
            target,
            weight=self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class BCELoss(_Loss):
    """Module form of :func:`xent.binary_cross_entropy` (input: probabilities). Prefer :class:`BCEWithLogitsLoss`.

    Shape:
        - Input: any shape. Target: the input's shape. Output: ``()``, or the input's shape with ``"none"``.
    """

    _repr_fields = ("label_smoothing",)

    def __init__(self, weight: torch.Tensor | None = None, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__(reduction)
        self.label_smoothing = sigmoid.check_binary_options(reduction=reduction, label_smoothing=label_smoothing)
        self.register_buffer("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return losses.binary_cross_entropy(
            input, target, weight=self.weight, reduction=self.reduction, label_smoothing=self.label_smoothing
        )
