"""The long-tail losses and weights (xent.losses.imbalance) — class-balanced weights, deferred re-weighting,
logit adjustment, balanced softmax, LDAM — against the papers' formulas, their identities, gradients and errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.losses.formulas import REDUCTIONS, C, check, problem


def test_class_balanced_weights_formula():
    counts = torch.tensor([5000.0, 2000.0, 500.0, 50.0, 5.0])
    beta = 0.999
    raw = [(1 - beta) / (1 - beta**n) for n in counts.tolist()]
    expected = torch.tensor([r / sum(raw) * 5 for r in raw])
    torch.testing.assert_close(xent.class_balanced_weights(counts, beta), expected)
    assert xent.class_balanced_weights(counts, 0.9999).sum().item() == pytest.approx(5.0)
    torch.testing.assert_close(xent.class_balanced_weights([3, 7, 100], beta=0.0), torch.ones(3))
    # β → 1 approaches inverse frequency.
    inverse = 1 / counts
    torch.testing.assert_close(
        xent.class_balanced_weights(counts, 1 - 1e-9), (inverse / inverse.sum() * 5).float(), rtol=1e-3, atol=0
    )


def test_deferred_reweighting_switches_at_start_epoch():
    counts = [100, 10, 1]
    assert torch.equal(xent.deferred_reweighting(counts, 3, start_epoch=4), torch.ones(3))
    assert torch.equal(xent.deferred_reweighting(counts, 4, start_epoch=4), xent.class_balanced_weights(counts))


COUNTED = {  # every function of the imbalance family, called with the given class counts
    "class_balanced_weights": lambda counts: xent.class_balanced_weights(counts, beta=0.9),
    "deferred_reweighting, before start_epoch": lambda counts: xent.deferred_reweighting(counts, 0, start_epoch=4),
    "deferred_reweighting": lambda counts: xent.deferred_reweighting(counts, 4, start_epoch=4),
    "logit_adjust": lambda counts: xent.logit_adjust(torch.randn(4, 3), counts),
    "logit_adjusted_cross_entropy": lambda counts: xent.logit_adjusted_cross_entropy(
        torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), class_counts=counts
    ),
    "balanced_softmax_cross_entropy": lambda counts: xent.balanced_softmax_cross_entropy(
        torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), class_counts=counts
    ),
    "ldam_margins": lambda counts: xent.ldam_margins(counts),
    "ldam_loss": lambda counts: xent.ldam_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), class_counts=counts),
}


@pytest.mark.parametrize("name", list(COUNTED))
@pytest.mark.parametrize(("bad", "shown"), [(0.0, "0"), (-2.0, "-2"), (math.nan, "nan"), (math.inf, "inf")])
def test_every_imbalance_function_rejects_a_class_count_that_is_not_positive(name, bad, shown):
    """One rule: a class with no sample has no prior, effective number or margin — never a silent weight of 0."""
    COUNTED[name](torch.tensor([10.0, 5.0, 1.0]))
    with pytest.raises(ValueError, match=rf"class_counts must be positive and finite, got {shown} for class 1$"):
        COUNTED[name](torch.tensor([10.0, bad, 1.0]))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjusted_matches_formula(reduction, tau):
    logits, target = problem(spatial=True)
    counts = torch.tensor([100.0, 50, 20, 10, 5, 1])
    log_prior = torch.log(counts.double() / counts.double().sum())
    adjusted = logits + tau * log_prior.view(1, C, 1)
    expected = F.cross_entropy(adjusted, target, reduction=reduction, label_smoothing=0.1)
    ours = xent.logit_adjusted_cross_entropy(
        logits, target, class_counts=counts, tau=tau, reduction=reduction, label_smoothing=0.1
    )
    check(ours, expected, (logits,))
    post_hoc = xent.logit_adjust(logits.detach(), counts, tau=tau)
    torch.testing.assert_close(post_hoc, logits.detach() - tau * log_prior.view(1, C, 1))


def test_logit_adjust_identities():
    logits, target = problem()
    counts = torch.tensor([100.0, 50, 20, 10, 5, 1])
    check(
        xent.logit_adjusted_cross_entropy(logits, target, class_counts=counts, tau=0.0),
        xent.cross_entropy(logits, target),
        (logits,),
    )
    check(
        xent.balanced_softmax_cross_entropy(logits, target, class_counts=counts),
        xent.logit_adjusted_cross_entropy(logits, target, class_counts=counts, tau=1.0),
        (logits,),
    )
    # Balanced softmax is CE on x + log n, written out.
    check(
        xent.balanced_softmax_cross_entropy(logits, target, class_counts=counts, reduction="sum"),
        F.cross_entropy(logits + counts.double().log(), target, reduction="sum"),
        (logits,),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("max_margin", "scale"), [(0.5, 30.0), (0.0, 1.0), (1.0, 10.0)])
def test_ldam_matches_formula(reduction, max_margin, scale):
    logits, target = problem()
    logits = torch.tanh(logits.detach()).requires_grad_()  # cosine-like logits
    counts = torch.tensor([400.0, 200, 100, 50, 20, 5])
    weight = torch.rand(C, dtype=torch.float64) + 0.5
    margins = counts.double() ** -0.25
    margins = margins * max_margin / margins.max()
    one_hot = F.one_hot(target.clamp_min(0), C).double()
    expected = F.cross_entropy(scale * (logits - margins * one_hot), target, weight=weight, reduction=reduction)
    ours = xent.ldam_loss(
        logits, target, class_counts=counts, max_margin=max_margin, scale=scale, weight=weight, reduction=reduction
    )
    check(ours, expected, (logits,))
    assert xent.ldam_margins(counts, max_margin).max().item() == pytest.approx(max_margin)


GRADCHECKED = {
    "la": lambda x, t: xent.logit_adjusted_cross_entropy(x, t, class_counts=[5, 4, 3, 2, 1, 1]),
    "ldam": lambda x, t: xent.ldam_loss(x, t, class_counts=[5, 4, 3, 2, 1, 1], scale=2.0),
}


@pytest.mark.parametrize("name", list(GRADCHECKED))
def test_gradcheck(name):
    logits = torch.randn(5, C, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 5, 1])
    assert torch.autograd.gradcheck(lambda x: GRADCHECKED[name](x, target), (logits,))


HALF_COUNTS = torch.tensor([400.0, 200, 100, 50, 20, 5])
FORMED = {  # each loss whose definition forms new logits from the input, and those logits written out in float64
    "ldam_loss": (
        lambda x, t, impl: xent.ldam_loss(x, t, class_counts=HALF_COUNTS, scale=30.0, reduction="none", impl=impl),
        lambda x, t: 30.0 * (x - xent.ldam_margins(HALF_COUNTS, 0.5)[t].unsqueeze(1) * F.one_hot(t, C)),
    ),
    "logit_adjusted_cross_entropy": (
        lambda x, t, impl: xent.logit_adjusted_cross_entropy(
            x, t, class_counts=HALF_COUNTS, tau=2.0, reduction="none", impl=impl
        ),
        lambda x, t: x + 2.0 * (HALF_COUNTS.double() / HALF_COUNTS.sum()).log(),
    ),
    "balanced_softmax_cross_entropy": (
        lambda x, t, impl: xent.balanced_softmax_cross_entropy(
            x, t, class_counts=HALF_COUNTS, reduction="none", impl=impl
        ),
        lambda x, t: x + HALF_COUNTS.double().log(),
    ),
}


@pytest.mark.parametrize("name", list(FORMED))
@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_form_the_loss_logits_in_float32(name, impl, dtype):
    """s (x − m) and x + τ log π are formed in float32 from half inputs, as the kernels form them: the loss and the
    gradient are the float64 ones up to their rounding to the input's dtype. Formed in half precision, they were
    off by s times the inputs' rounding: the fuzz layer's float16 LDAM case (s = 30, x ≈ 6) gave 11.875 for
    11.953."""
    loss_of, formed = FORMED[name]
    x = (torch.randn(64, C, dtype=torch.float64) * 16).to(dtype).requires_grad_()
    target = torch.randint(C, (64,))
    exact_x = x.detach().double().requires_grad_()
    exact = F.cross_entropy(formed(exact_x, target), target, reduction="none")
    loss = loss_of(x, target, impl)
    assert loss.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), exact.detach(), rtol=eps, atol=1e-4)
    grad_output = torch.randn(64, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, x, grad_output.to(dtype))
    (exact_grad,) = torch.autograd.grad(exact, exact_x, grad_output.to(dtype).double())
    torch.testing.assert_close(grad.double(), exact_grad, rtol=eps, atol=eps * exact_grad.abs().max().item())


def test_ldam_in_float16_matches_the_fuzz_case():
    x = torch.tensor([6.6133, 2.6699, 0.6167, 6.2148], dtype=torch.float16)
    loss = xent.ldam_loss(x, torch.tensor(3), class_counts=torch.ones(4), max_margin=0.0, scale=30.0)
    exact = F.cross_entropy(30.0 * x.double(), torch.tensor(3))
    assert loss.dtype == torch.float16
    assert loss.item() == exact.half().item() == 11.953125


# --- errors ----------------------------------------------------------------------------------------------------

LOGITS, TARGET = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
COUNTS = [10, 5, 1]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: xent.class_balanced_weights(COUNTS, beta=1.0), ValueError, r"beta must be in \[0, 1\), got 1"),
        (lambda: xent.class_balanced_weights(COUNTS, beta=-0.1), ValueError, r"beta must be in \[0, 1\)"),
        (
            lambda: xent.class_balanced_weights([3, -1, 2]),
            ValueError,
            r"class_counts must be positive and finite, got -1 for class 1",
        ),
        (lambda: xent.class_balanced_weights([[3, 1]]), ValueError, r"class_counts must have shape \(C,\)"),
        (
            lambda: xent.logit_adjusted_cross_entropy(LOGITS, TARGET, class_counts=[1, 2]),
            ValueError,
            r"class_counts has 2 entries but input has 3 classes",
        ),
        (
            lambda: xent.logit_adjusted_cross_entropy(LOGITS, TARGET, class_counts=[1, 0, 2]),
            ValueError,
            r"class_counts must be positive",
        ),
        (
            lambda: xent.logit_adjusted_cross_entropy(LOGITS, TARGET, class_counts=COUNTS, tau=-1),
            ValueError,
            r"tau must be in",
        ),
        (
            lambda: xent.ldam_loss(LOGITS, TARGET, class_counts=COUNTS, max_margin=-0.1),
            ValueError,
            r"max_margin must be in \[0, inf\]",
        ),
        (lambda: xent.ldam_loss(LOGITS, TARGET, class_counts=[1, 2, 3, 4]), ValueError, r"class_counts has 4 entries"),
        (
            lambda: xent.ldam_loss(LOGITS, TARGET, class_counts=COUNTS, scale=0),
            ValueError,
            r"scale must be in \(0, inf\]",
        ),
    ],
)
def test_bad_hyperparameters(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: xent.logit_adjust(torch.zeros(2, 3, dtype=torch.long), [1, 2, 3]), r"^logits must be a floating"),
        (lambda: xent.class_balanced_weights(None), r"^class_counts must be a tensor or a sequence of numbers"),
    ],
)
def test_errors_name_the_callers_argument(call, message):
    """Found by the fuzz layer: each error names the argument as the caller wrote it."""
    with pytest.raises((ValueError, TypeError), match=message):
        call()
