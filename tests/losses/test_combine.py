"""Weighted sums of losses (xent.losses.combine): the function and its module, and their errors."""

import math

import pytest
import torch

import xent
from tests.conftest import assert_close
from tests.losses.formulas import check, problem


def test_weighted_sum_module_and_function():
    logits, target = problem()
    criterion = xent.nn.WeightedSum(
        {
            "ce": (1.0, xent.nn.CrossEntropyLoss()),
            "focal": (0.5, xent.nn.FocalLoss(gamma=2.0)),
            "gce": (2.0, xent.generalized_cross_entropy),
        }
    )
    total = criterion(logits, target)
    ce, focal, gce = (
        xent.cross_entropy(logits, target),
        xent.focal_loss(logits, target),
        xent.generalized_cross_entropy(logits, target),
    )
    check(total, ce + 0.5 * focal + 2.0 * gce, (logits,))
    assert set(criterion.last_terms) == {"ce", "focal", "gce"}
    assert criterion.last_terms["focal"].item() == pytest.approx(focal.item())
    assert not criterion.last_terms["ce"].requires_grad
    assert_close(xent.weighted_sum({"a": ce, "b": focal}, {"a": 0.3, "b": 0.7}), 0.3 * ce + 0.7 * focal)


# --- errors ----------------------------------------------------------------------------------------------------

LOGITS, TARGET = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: xent.weighted_sum({"a": LOGITS.sum()}, {"b": 1.0}), ValueError, r"must name the same losses"),
        (
            lambda: xent.nn.WeightedSum({"a": (math.nan, xent.cross_entropy)}),
            ValueError,
            r"weights\['a'\] must be a finite number",
        ),
    ],
)
def test_bad_hyperparameters(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: xent.weighted_sum(True, {}), r"^terms must be a mapping"),
        (lambda: xent.weighted_sum({"a": 1.0}, {"a": 1.0}), r"^terms\['a'\] must be a loss tensor, got float"),
    ],
)
def test_errors_name_the_callers_argument(call, message):
    """Found by the fuzz layer: each error names the argument as the caller wrote it."""
    with pytest.raises((ValueError, TypeError), match=message):
        call()
