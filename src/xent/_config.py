"""Run-time switches shared by every loss.

Value checks look at tensor *contents* (is every class index in range, is every probability in [0, 1]). On a GPU
they force a device-to-host synchronisation, which stalls the launch queue, so by default they run only for CPU
tensors. Shape, dtype and option checks cost nothing and are always on.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_value_checks: bool | None = None  # None: "auto", on for CPU tensors only
# Set while a loss runs a definition of itself made of other public losses, after it checked the values once: the
# inner calls skip the host reads (one pass of the value checks per call).
_values_checked: contextvars.ContextVar[bool] = contextvars.ContextVar("xent_values_checked", default=False)


def set_value_checks(enabled: bool | None) -> None:
    """Switch the value checks that need a device-to-host sync on (``True``), off (``False``), or back to the
    default (``None``: on for CPU tensors, off for CUDA and other accelerators)."""
    global _value_checks
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    _value_checks = enabled


@contextlib.contextmanager
def value_checks(enabled: bool | None) -> Iterator[None]:
    """Context manager form of :func:`set_value_checks`; restores the previous setting on exit."""
    previous = _value_checks
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


@contextlib.contextmanager
def values_checked() -> Iterator[None]:
    """The values of the current call are checked: nested public calls skip their value checks."""
    token = _values_checked.set(True)
    try:
        yield
    finally:
        _values_checked.reset(token)


def value_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether value checks should run for ``tensor`` under the current setting."""
    if _values_checked.get():
        return False
    if _value_checks is None:
        return tensor.device.type == "cpu"
    return _value_checks
