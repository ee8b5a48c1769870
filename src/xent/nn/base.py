"""The base of :mod:`xent.nn`'s loss modules: :class:`_Loss` stores a function's options and forwards every call to
it, checking the options of a fused-family loss at construction through the registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from xent.losses.checks import check_reduction_and_ignore_index
from xent.losses.family import entry_of_function


def _check_shared_options(options: Mapping[str, Any]) -> None:
    """The reduction and ignore_index of a softmax loss, as its function checks them."""
    check_reduction_and_ignore_index(options.get("reduction", "mean"), options.get("ignore_index", -100))


class _Loss(torch.nn.Module):
    """Stores options and forwards every call to :attr:`function` with them; a loss of the fused family
    (:data:`xent.losses.family.FAMILY`) has its options checked at construction, with the function's messages."""

    function: Callable[..., torch.Tensor]
    tensor_options: tuple[str, ...] = ("weight",)

    def __init__(self, **options: object) -> None:
        super().__init__()
        entry = entry_of_function(type(self).function)
        if entry is not None:
            _check_shared_options(options)
            entry.check_values(options)
        self._option_names = tuple(options)
        for name, value in options.items():
            if name in self.tensor_options and (value is None or isinstance(value, torch.Tensor)):
                self.register_buffer(name, value)
            elif name in self.tensor_options and isinstance(value, Sequence) and not isinstance(value, str):
                try:
                    self.register_buffer(name, torch.as_tensor(value, dtype=torch.float64))
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"{name} must be a tensor or a sequence of numbers, got {value!r}") from None
            else:
                setattr(self, name, value)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        options = {name: getattr(self, name) for name in self._option_names}
        return type(self).function(*inputs, **options)

    def extra_repr(self) -> str:
        shown = (name for name in self._option_names if name not in self.tensor_options)
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
