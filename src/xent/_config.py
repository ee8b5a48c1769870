"""Run-time switches shared by every loss.

Value checks look at tensor *contents* (is every class index in range, is every probability in [0, 1]). On a GPU
they force a device-to-host synchronisation, which stalls the launch queue, so by default they run only for CPU
tensors. Shape, dtype and option checks cost nothing and are always on.

Under ``torch.compile`` the checks that read values are not traced (a host read is a graph break): the fused
kernels' custom operators check the class indices they read at run time instead (the targets of a loss or of
log-probabilities, a distillation's hard labels), with the same message; on the reference path an index outside the
classes stops in the compiled code's bounds check (a ``RuntimeError``); the range of probability targets and the
sign of class weights are checked eagerly only.
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
    default (``None``: on for CPU tensors, off for CUDA and other accelerators). Under ``torch.compile`` the
    setting is read when a call is traced: no check that reads values is traced; the fused kernels check the class
    indices when they run, and elsewhere the compiled code's bounds check stops an index outside the classes."""
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
    """The values of the current call are checked: nested public calls skip their value checks. (Nothing to do
    while compiling, where no check reads values.)"""
    if torch.compiler.is_compiling():
        yield
        return
    token = _values_checked.set(True)
    try:
        yield
    finally:
        _values_checked.reset(token)


def _setting(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" if _value_checks is None else _value_checks


def value_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether value checks should run for ``tensor`` now: as the setting asks, once per call, and never while
    ``torch.compile`` traces — a host read would break the graph (see :func:`value_checks_deferred`)."""
    if torch.compiler.is_compiling():
        return False
    return not _values_checked.get() and _setting(tensor)


def value_checks_deferred(tensor: torch.Tensor) -> bool:
    """Whether a call being compiled asks for the value checks of ``tensor``: the fused kernels' operators then
    check the class indices themselves when they run (:mod:`xent.kernels.ops`); elsewhere the compiled code's own
    bounds check stops an index outside the classes."""
    return torch.compiler.is_compiling() and _setting(tensor)
