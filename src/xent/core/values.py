"""The value check every class-index loss runs, shared by the public functions (eagerly) and the fused kernels'
custom operators (at run time, under ``torch.compile``)."""

from __future__ import annotations

import torch

from xent._config import value_checks_enabled


def check_class_indices(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every index in [0, C) or equal to ``ignore_index``. Needs a host sync, so it obeys the value-check switch."""
    if not value_checks_enabled(target) or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"target holds class index {value}, outside [0, {num_classes}) for input with {num_classes} classes "
            f"(and not ignore_index={ignore_index})"
        )
