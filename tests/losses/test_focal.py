"""Focal loss, sigmoid focal loss and poly-1 cross-entropy (xent.losses.focal) against the papers' formulas
(torchvision's for the sigmoid focal loss), their identities, gradients and errors."""

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.losses.formulas import REDUCTIONS, C, N, check, p_y, problem, reduced


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [None, 0.25, "per-class"])
@pytest.mark.parametrize("spatial", [False, True])
def test_focal_matches_formula(reduction, gamma, alpha, spatial):
    logits, target = problem(spatial=spatial)
    weight = torch.rand(C, dtype=torch.float64) + 0.2
    alpha_value = torch.rand(C, dtype=torch.float64) if alpha == "per-class" else alpha
    ours = xent.focal_loss(logits, target, gamma=gamma, alpha=alpha_value, weight=weight, reduction=reduction)
    p = p_y(logits, target)
    per_element = -((1 - p) ** gamma) * torch.log(p)
    if alpha == "per-class":
        per_element = per_element * alpha_value[target.clamp_min(0)]
    elif alpha is not None:
        per_element = per_element * alpha
    check(ours, reduced(per_element, target, weight, reduction), (logits,))


def test_focal_gamma_zero_is_cross_entropy_and_never_exceeds_it():
    logits, target = problem()
    check(xent.focal_loss(logits, target, gamma=0.0), xent.cross_entropy(logits, target), (logits,))
    focal = xent.focal_loss(logits, target, gamma=2.0, reduction="none")
    assert torch.all(focal <= xent.cross_entropy(logits, target, reduction="none") + 1e-15)


def test_focal_is_finite_for_confident_predictions():
    logits = torch.tensor([[1e4, -1e4, 0.0], [30.0, 0.0, 0.0]], requires_grad=True)
    loss = xent.focal_loss(logits, torch.tensor([0, 0]), gamma=0.5, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("gamma", "alpha"), [(0.0, None), (2.0, 0.25), (1.5, 0.6), (2.0, None)])
def test_sigmoid_focal_matches_torchvision_formula(reduction, gamma, alpha):
    logits = (torch.randn(N, C, dtype=torch.float64) * 3).requires_grad_()
    target = torch.rand(N, C, dtype=torch.float64)
    target[:4] = target[:4].round()
    ours = xent.sigmoid_focal_loss(logits, target, gamma=gamma, alpha=alpha, reduction=reduction)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    expected = {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    check(ours, expected, (logits,))


def test_sigmoid_focal_gamma_zero_no_alpha_is_bce_and_extreme_logits_are_finite():
    logits = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    target = torch.randint(2, (N, C)).double()
    check(
        xent.sigmoid_focal_loss(logits, target, gamma=0.0, alpha=None),
        xent.binary_cross_entropy_with_logits(logits, target),
        (logits,),
    )
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        extreme = torch.tensor([1e4, -1e4, 1e4, -1e4]).to(dtype).requires_grad_()
        loss = xent.sigmoid_focal_loss(extreme, torch.tensor([0.0, 1.0, 1.0, 0.0]).to(dtype), reduction="none")
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(extreme.grad).all()
        assert loss[0].float().item() == pytest.approx(0.75 * 1e4, rel=1e-2)  # α_t = 1 - α for a negative


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("epsilon", [-1.0, 0.0, 1.0, 3.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_poly1_matches_formula(reduction, epsilon, smoothing):
    logits, target = problem()
    weight = torch.rand(C, dtype=torch.float64) + 0.2
    ours = xent.poly1_cross_entropy(
        logits, target, epsilon=epsilon, weight=weight, reduction=reduction, label_smoothing=smoothing
    )
    ce = F.cross_entropy(logits, target, weight=weight, reduction="none", label_smoothing=smoothing)
    one_hot = F.one_hot(target.clamp_min(0), C).double() * (1 - smoothing) + smoothing / C
    p_t = (one_hot * torch.softmax(logits, 1)).sum(1)
    kept = (target != -100).double()
    w_y = weight[target.clamp_min(0)] * kept
    per_element = ce + epsilon * (1 - p_t) * w_y
    expected = {"none": per_element, "sum": per_element.sum(), "mean": per_element.sum() / w_y.sum()}[reduction]
    check(ours, expected, (logits,))


def test_poly1_epsilon_zero_is_cross_entropy():
    logits, target = problem()
    check(xent.poly1_cross_entropy(logits, target, epsilon=0.0), xent.cross_entropy(logits, target), (logits,))


GRADCHECKED = {
    "focal": lambda x, t: xent.focal_loss(x, t, gamma=1.5, alpha=0.5),
    "poly1": lambda x, t: xent.poly1_cross_entropy(x, t, epsilon=2.0, label_smoothing=0.1),
}


@pytest.mark.parametrize("name", list(GRADCHECKED))
def test_gradcheck(name):
    logits = torch.randn(5, C, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 5, 1])
    assert torch.autograd.gradcheck(lambda x: GRADCHECKED[name](x, target), (logits,))


def test_sigmoid_focal_gradcheck():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.rand(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: xent.sigmoid_focal_loss(x, target, gamma=1.5), (logits,))


def test_sigmoid_focal_gradient_of_a_hard_target_is_finite():
    """Autograd through log(t) gave NaN for a target of exactly 0 or 1 that requires grad."""
    x = torch.tensor([0.15, 3.0, -2.0, 5.0], dtype=torch.float64)
    for gamma in (1.0, 2.0):
        t = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
        xent.sigmoid_focal_loss(x, t, gamma=gamma, alpha=None, reduction="sum").backward()
        expected_t = t.detach().clone().requires_grad_()
        p = torch.sigmoid(x)
        ce = -(expected_t * F.logsigmoid(x) + (1 - expected_t) * F.logsigmoid(-x))
        (ce * (1 - (p * expected_t + (1 - p) * (1 - expected_t))) ** gamma).sum().backward()
        torch.testing.assert_close(t.grad, expected_t.grad, rtol=1e-12, atol=1e-15)


def test_sigmoid_focal_loss_under_torch_func_transforms():
    """Its written-out gradients live in a custom autograd Function with forward-mode and vmap support, so
    torch.func's transforms give the plain formula's derivatives (value checks off: vmap has no data-dependent ifs)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    t = torch.rand(4, 3, dtype=torch.float64, generator=generator)

    def ours(x, t):
        return xent.sigmoid_focal_loss(x, t, gamma=2.0, alpha=0.25, reduction="sum")

    def formula(x, t):
        p = torch.sigmoid(x)
        ce = -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
        return (ce * (1 - (p * t + (1 - p) * (1 - t))) ** 2 * (0.25 * t + 0.75 * (1 - t))).sum()

    with xent.value_checks(False):
        for transform in (torch.func.grad, torch.func.jacfwd, torch.func.jacrev, torch.func.hessian):
            for actual, expected in zip(
                transform(ours, argnums=(0, 1))(x, t), transform(formula, argnums=(0, 1))(x, t), strict=True
            ):
                torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
        per_row = torch.stack([formula(a, b) for a, b in zip(x, t, strict=True)])
        torch.testing.assert_close(torch.func.vmap(ours)(x, t), per_row)


# --- errors ----------------------------------------------------------------------------------------------------

LOGITS, TARGET = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: xent.focal_loss(LOGITS, TARGET, gamma=-1.0), ValueError, r"gamma must be in \[0, inf\], got -1"),
        (
            lambda: xent.focal_loss(LOGITS, TARGET, alpha=torch.ones(4)),
            ValueError,
            r"alpha must be a scalar or have shape \(3,\)",
        ),
        (lambda: xent.focal_loss(LOGITS, torch.rand(4, 3)), TypeError, r"focal_loss takes class indices"),
        (lambda: xent.sigmoid_focal_loss(LOGITS, torch.rand(4, 3), gamma=-0.5), ValueError, r"gamma must be in"),
        (
            lambda: xent.sigmoid_focal_loss(LOGITS, torch.rand(4, 3), alpha=1.5),
            ValueError,
            r"alpha must be in \[0, 1\]",
        ),
        (
            lambda: xent.poly1_cross_entropy(LOGITS, TARGET, epsilon=-1.5),
            ValueError,
            r"epsilon must be in \[-1, inf\], got -1.5",
        ),
    ],
)
def test_bad_hyperparameters(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: xent.focal_loss(None, torch.zeros(2)), r"^input must be a torch.Tensor, got NoneType"),
    ],
)
def test_errors_name_the_callers_argument(call, message):
    """Found by the fuzz layer: each error names the argument as the caller wrote it."""
    with pytest.raises((ValueError, TypeError), match=message):
        call()
