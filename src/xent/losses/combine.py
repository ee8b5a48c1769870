"""Weighted sums of several losses."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def check_mapping(name: str, value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping from term name to value, got {type(value).__name__}")


def check_term_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Finite float weights keyed by term name."""
    check_mapping("weights", weights)
    checked = {}
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"weights[{name!r}] must be a finite number, got {value!r}")
        checked[name] = float(value)
    return checked


def weighted_sum(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    r""":math:`\sum_k \lambda_k \mathcal{L}_k` of named loss terms, each with its weight.

    Use it when the terms take different inputs (a hard-label loss and a distillation loss); for terms that take
    the same ``(input, target)`` the module :class:`xent.nn.WeightedSum` also records each term for logging.

    Args:
        terms: loss values by name, each a tensor of the same shape (usually ``()``).
        weights: a weight for every term, by the same names.
    """
    check_mapping("terms", terms)
    weights = check_term_weights(weights)
    if set(terms) != set(weights):
        raise ValueError(f"terms {sorted(terms)} and weights {sorted(weights)} must name the same losses")
    if not terms:
        raise ValueError("terms must name at least one loss")
    for name, value in terms.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"terms[{name!r}] must be a loss tensor, got {type(value).__name__}")
    weighted = [weights[name] * value for name, value in terms.items()]
    total = weighted[0]
    for value in weighted[1:]:
        total = total + value
    return total
