"""The noise-robust losses (xent.losses.robust) — generalized and symmetric cross-entropy — against the papers'
formulas, their limits, gradients and errors."""

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.losses.formulas import REDUCTIONS, C, check, p_y, problem, reduced


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("q", [0.1, 0.7, 1.0])
def test_generalized_cross_entropy_matches_formula(reduction, q):
    logits, target = problem(spatial=True)
    weight = torch.rand(C, dtype=torch.float64) + 0.2
    ours = xent.generalized_cross_entropy(logits, target, q=q, weight=weight, reduction=reduction)
    per_element = (1 - p_y(logits, target) ** q) / q
    check(ours, reduced(per_element, target, weight, reduction), (logits,))


def test_generalized_cross_entropy_tends_to_cross_entropy_as_q_vanishes():
    logits, target = problem()
    ce = xent.cross_entropy(logits, target)
    gce = xent.generalized_cross_entropy(logits, target, q=1e-7)
    torch.testing.assert_close(gce, ce, rtol=1e-5, atol=0)
    mae = xent.generalized_cross_entropy(logits, target, q=1.0, reduction="none")
    kept = target != -100
    torch.testing.assert_close(mae[kept], 1 - p_y(logits, target)[kept])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("alpha", "beta", "log_zero"), [(0.1, 1.0, -4.0), (1.0, 0.5, -9.2), (0.0, 1.0, -1.0)])
def test_symmetric_cross_entropy_matches_formula(reduction, alpha, beta, log_zero):
    logits, target = problem()
    weight = torch.rand(C, dtype=torch.float64) + 0.2
    ours = xent.symmetric_cross_entropy(
        logits, target, alpha=alpha, beta=beta, log_zero=log_zero, weight=weight, reduction=reduction
    )
    probs = torch.softmax(logits, 1)
    one_hot = F.one_hot(target.clamp_min(0), C).double()
    log_label = torch.where(
        one_hot > 0, 0.0, torch.tensor(log_zero, dtype=torch.float64)
    )  # log of the one-hot label, log 0 := A
    rce = -(probs * log_label).sum(1)
    ce = -torch.log(p_y(logits, target))
    check(ours, reduced(alpha * ce + beta * rce, target, weight, reduction), (logits,))


GRADCHECKED = {
    "gce": lambda x, t: xent.generalized_cross_entropy(x, t, q=0.5),
    "sce": lambda x, t: xent.symmetric_cross_entropy(x, t),
}


@pytest.mark.parametrize("name", list(GRADCHECKED))
def test_gradcheck(name):
    logits = torch.randn(5, C, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 5, 1])
    assert torch.autograd.gradcheck(lambda x: GRADCHECKED[name](x, target), (logits,))


# --- errors ----------------------------------------------------------------------------------------------------

LOGITS, TARGET = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: xent.generalized_cross_entropy(LOGITS, TARGET, q=0.0), ValueError, r"q must be in \(0, 1\], got 0"),
        (lambda: xent.generalized_cross_entropy(LOGITS, TARGET, q=1.5), ValueError, r"q must be in \(0, 1\], got 1.5"),
        (lambda: xent.symmetric_cross_entropy(LOGITS, TARGET, log_zero=0.0), ValueError, r"log_zero must be in"),
    ],
)
def test_bad_hyperparameters(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: xent.generalized_cross_entropy(torch.zeros(2, 3), torch.rand(2, 3)),
            r"generalized_cross_entropy takes class indices as target",
        ),
    ],
)
def test_errors_name_the_callers_argument(call, message):
    """Found by the fuzz layer: each error names the argument as the caller wrote it."""
    with pytest.raises((ValueError, TypeError), match=message):
        call()
