"""Argument validation shared by every loss.

Each check raises ``ValueError`` or ``TypeError`` with a sentence that names the argument and shows the bad value
or shape, so a user can act on it without reading our code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeGuard, overload

import torch

from xent._config import value_checks_enabled
from xent.core.values import check_class_indices as check_class_indices  # where every loss finds its checks

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

REDUCTIONS = ("none", "mean", "sum")


def shape_str(shape: torch.Size | Sequence[int]) -> str:
    """``(8, 3)`` for a shape, ``(5,)`` for one dimension, ``()`` for a scalar."""
    dims = tuple(shape)
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(map(str, dims))})"


def shown(value: object) -> str:
    """A value as an error message shows it, on one line: its repr for strings, numbers and None, its type otherwise
    (a tensor's repr spans lines)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return repr(value)
    return f"a {type(value).__name__}"


def check_reduction(reduction: str, allowed: Sequence[str] = REDUCTIONS) -> None:
    if not isinstance(reduction, str) or reduction not in allowed:
        options = ", ".join(repr(r) for r in allowed)
        raise ValueError(f"reduction must be one of {options}, got {shown(reduction)}")


def check_ignore_index(ignore_index: object) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        got = shown(ignore_index)
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {got}"
                        if not got.startswith("a ") else f"ignore_index must be an int, got {got}")  # fmt: skip
    return ignore_index


def check_reduction_and_ignore_index(reduction: str, ignore_index: object) -> None:
    """The two options every softmax loss of the family shares, whatever its own."""
    check_reduction(reduction)
    check_ignore_index(ignore_index)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, tensor: object) -> torch.Tensor:
    tensor = check_tensor(name, tensor)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    return tensor


def is_dtensor(tensor: object) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``torch.distributed`` DTensor (a sharded or replicated parameter, activation)."""
    if tensor is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def check_not_sharded(**tensors: torch.Tensor | None) -> None:
    """A linear head's tensors must be whole, plain tensors: a DTensor (FSDP2's shard of a parameter outside its
    module's forward, a tensor-parallel head's) is refused, naming it and the way to the loss it needs."""
    for name, tensor in tensors.items():
        if is_dtensor(tensor):
            raise TypeError(
                f"{name} is a DTensor (placements {tuple(tensor.placements)}, shape {shape_str(tensor.shape)}); "
                "xent's linear losses take whole tensors. A parameter FSDP2 shards (fully_shard) is whole only "
                "inside its module's forward: compute the loss there (xent.hf.patch(model) does, or register your "
                "method with torch.distributed.fsdp.register_fsdp_forward_method). A head sharded over the "
                "vocabulary (ColwiseParallel) takes xent.distributed's vocab_parallel_linear_* functions"
            )


def check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = f"shape {shape_str(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:60]
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {shown}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def check_in_range(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a float, or a ``ValueError`` that shows the interval it must lie in."""
    value = check_number(name, value)
    above_low = value >= low if low_inclusive else value > low
    below_high = value <= high if high_inclusive else value < high
    if not (above_low and below_high):
        interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value:g}")
    return value


def check_chunk_size(chunk_size: int | None) -> int | None:
    """Tokens per chunk of a fused linear loss: a positive int, or None for the default."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {shown(chunk_size)}")
    return chunk_size


@overload
def check_class_weight(name: str, weight: torch.Tensor, num_classes: int) -> torch.Tensor: ...
@overload
def check_class_weight(name: str, weight: None, num_classes: int) -> None: ...
def check_class_weight(name: str, weight: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """A per-class weight: floating, shape (C,), no negative entry (value-checked)."""
    if weight is None:
        return None
    weight = check_floating(name, weight)
    if weight.shape != (num_classes,):
        raise ValueError(
            f"{name} must have shape ({num_classes},), one entry per class, got shape {shape_str(weight.shape)}"
        )
    check_non_negative(name, weight)
    return weight


def check_non_negative(name: str, tensor: torch.Tensor) -> None:
    """No negative (or NaN) entry: a weighted mean over negative weights has no meaning, and a zero sum of mixed-sign
    weights would pass for "nothing to average". Needs a host sync, so it obeys the value-check switch."""
    if not value_checks_enabled(tensor) or tensor.numel() == 0:
        return
    bad = ~(tensor >= 0)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        where = index[0] if len(index) == 1 else index
        raise ValueError(f"{name} must be non-negative, got {float(tensor[bad][0]):g} at index {where}")


def check_broadcasts_to(name: str, tensor: torch.Tensor | None, shape: torch.Size, what: str) -> torch.Tensor | None:
    """A tensor that must broadcast to ``shape`` without growing it."""
    if tensor is None:
        return None
    tensor = check_floating(name, tensor)
    try:
        broadcast = torch.broadcast_shapes(tensor.shape, shape)
    except RuntimeError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(f"{name} of shape {shape_str(tensor.shape)} does not broadcast to {what} {shape_str(shape)}")
    return tensor


def check_probabilities(name: str, tensor: torch.Tensor) -> None:
    """Every entry in [0, 1]. Needs a host sync, so it obeys the value-check switch."""
    if not value_checks_enabled(tensor) or tensor.numel() == 0:
        return
    bad = ~((tensor >= 0) & (tensor <= 1))  # also catches NaN
    if bool(bad.any()):
        value = float(tensor.detach()[bad][0])
        raise ValueError(f"{name} must hold probabilities in [0, 1], found {value:g}")


def is_probability_target(
    target: torch.Tensor, *, input_shape: torch.Size, batch_shape: torch.Size, probs_shape: torch.Size
) -> bool:
    """Whether ``target`` holds probabilities (floating, ``probs_shape``) rather than class indices (integer,
    ``batch_shape``); anything else is an error that says which two shapes would do."""
    if target.is_floating_point() and target.shape == probs_shape:
        return True
    if target.shape != batch_shape:
        raise ValueError(
            f"target has shape {shape_str(target.shape)} but input has shape {shape_str(input_shape)}; "
            f"expected {shape_str(batch_shape)} class indices or {shape_str(probs_shape)} probabilities"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target of shape {shape_str(target.shape)} holds class indices and must have an integer dtype, "
            f"got {target.dtype} (use target.long()); probabilities need shape {shape_str(probs_shape)}"
        )
    return False
