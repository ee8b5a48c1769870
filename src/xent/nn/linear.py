"""The modules of the linear-head losses (:mod:`xent.nn`): :class:`LinearLoss` (any loss of the fused family) and
:class:`LinearCrossEntropyLoss`; the head's weight and bias are arguments of ``forward``, as they belong to the
model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from xent import losses
from xent.losses.family import family_loss
from xent.nn.base import _check_shared_options


class LinearLoss(torch.nn.Module):
    """Module form of :func:`xent.linear_loss`: ``forward(input, linear_weight, target, linear_bias=None)``.

    Stores the loss (a function of the family or its name) and its options; the head's weight and bias belong to
    the model and are arguments of ``forward``. Options are checked at construction, as the function checks them.

    Example:
        >>> lm_head = torch.nn.Linear(64, 1000, bias=False)                   # a model's output layer
        >>> hidden, tokens = torch.randn(2, 16, 64), torch.randint(1000, (2, 16))
        >>> criterion = xent.nn.LinearLoss(xent.focal_loss, gamma=2.0)
        >>> criterion(hidden, lm_head.weight, tokens).backward()             # lm_head.weight.grad is set
    """

    def __init__(self, loss: Callable[..., torch.Tensor] | str, **options: object) -> None:
        super().__init__()
        entry = family_loss(loss)
        self.loss_name, self._option_names = entry.name, tuple(options)
        for key, value in options.items():  # tensors are buffers: they follow .to(device) and the state_dict
            if isinstance(value, torch.Tensor):
                self.register_buffer(key, value)
            else:
                setattr(self, key, value)
        # the loss's own options, the reduction and ignore_index are checked now; weight etc. with the tensors
        _check_shared_options(options)
        entry.check_values(options)

    def forward(
        self,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        target: torch.Tensor,
        linear_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return losses.linear_loss(self.loss_name, input, linear_weight, target, linear_bias=linear_bias, **self.options)

    @property
    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        shown = [f"{key}={value!r}" for key, value in self.options.items() if not isinstance(value, torch.Tensor)]
        return ", ".join([self.loss_name, *shown])


class LinearCrossEntropyLoss(LinearLoss):
    """Module form of :func:`xent.linear_cross_entropy`: ``forward(input, linear_weight, target, linear_bias=None)``.

    The head's weight and bias are arguments of ``forward`` (they belong to the model); the module stores the loss
    options: those of :class:`CrossEntropyLoss`, ``chunk_size`` and ``weight_grad_dtype``.

    Example:
        >>> lm_head = torch.nn.Linear(64, 1000, bias=False)                   # a model's output layer
        >>> hidden, tokens = torch.randn(2, 16, 64), torch.randint(1000, (2, 16))
        >>> criterion = xent.nn.LinearCrossEntropyLoss(z_loss=1e-4)
        >>> loss = criterion(hidden, lm_head.weight, tokens)                 # = CrossEntropyLoss of lm_head(hidden)
        >>> torch.testing.assert_close(loss, xent.nn.CrossEntropyLoss(z_loss=1e-4)(lm_head(hidden).flatten(0, 1),
        ...                                                                  tokens.flatten()))
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        weight_grad_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            "cross_entropy",
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            chunk_size=chunk_size,
            weight_grad_dtype=weight_grad_dtype,
        )
