"""PyTorch's autocast policy for losses, shared by every loss.

Under ``torch.autocast`` PyTorch runs its losses in float32 (float16, bfloat16 and float32 arguments are cast to
float32, float64 ones are left alone) and returns float32, while ``F.linear`` runs in the autocast dtype. xent follows
the same policy, and runs its own code with autocast switched off so that a matrix product inside a loss is not
silently lowered to half precision.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast, overload

import torch

_LOWER = (torch.float16, torch.bfloat16)
F = TypeVar("F", bound=Callable[..., torch.Tensor])


def autocast_on(tensor: torch.Tensor) -> bool:
    """Whether autocast is enabled for the device type of ``tensor``."""
    return torch.is_autocast_enabled(tensor.device.type)


def result_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype a loss of ``input`` returns: float32 under autocast (float64 stays float64), else the input's."""
    if autocast_on(input) and input.dtype != torch.float64:
        return torch.float32
    return input.dtype


def autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast switched off for the device type of ``tensor`` (a no-op when it is not on)."""
    if not autocast_on(tensor):
        return contextlib.nullcontext()
    return torch.autocast(tensor.device.type, enabled=False)


@overload
def cast_for_linear(tensor: torch.Tensor) -> torch.Tensor: ...
@overload
def cast_for_linear(tensor: None) -> None: ...
def cast_for_linear(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` as ``F.linear`` sees it under autocast: in the autocast dtype unless it is float64. The cast is
    recorded by autograd, so the gradient returns in the tensor's own dtype."""
    if not isinstance(tensor, torch.Tensor) or not autocast_on(tensor) or tensor.dtype == torch.float64:
        return tensor  # anything but a tensor is left to the caller's checks, which name the argument
    return tensor.to(torch.get_autocast_dtype(tensor.device.type))


def _upcast(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.dtype in _LOWER:
        return value.float()
    return value


def float32_under_autocast(loss: F) -> F:
    """Decorator: under autocast, ``loss`` gets its half-precision tensor arguments in float32 and runs with autocast
    off, so it computes and returns float32 as PyTorch's losses do. Without autocast it is called unchanged."""

    @functools.wraps(loss)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        first = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
        if first is None or not autocast_on(first):
            return loss(*args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return loss(*map(_upcast, args), **{name: _upcast(value) for name, value in kwargs.items()})

    return cast(F, wrapper)
