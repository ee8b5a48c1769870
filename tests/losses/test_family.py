"""The cross-entropy family against plain float64 references written from each paper's formula."""

import math

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.conftest import assert_close

N, C = 11, 6
REDUCTIONS = ("none", "mean", "sum")


def _problem(dtype=torch.float64, ignore=True, spatial=False):
    shape = (N, C, 3) if spatial else (N, C)
    logits = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    target = torch.randint(C, (N, 3) if spatial else (N,))
    if ignore:
        target.view(-1)[::4] = -100
    return logits, target


def _reduce(per_element, target, weight, reduction):
    """Reference reduction: weighted mean over kept targets, as PyTorch's cross-entropy."""
    kept = (target != -100).double()
    w = weight[target.clamp_min(0)] if weight is not None else torch.ones_like(kept)
    per_element = per_element * w * kept
    if reduction == "none":
        return per_element
    if reduction == "sum":
        return per_element.sum()
    return per_element.sum() / (w * kept).sum()


def _p_y(logits, target):
    """p_y of each element with the class dimension at 1: (N, C[, d]) → (N[, d])."""
    probs = torch.softmax(logits, dim=1)
    return probs.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)


def _check(ours, expected, inputs, dtype=torch.float64):
    assert_close(ours, expected, dtype)
    grad_output = torch.randn_like(ours)
    for grad_ours, grad_expected in zip(
        torch.autograd.grad(ours, inputs, grad_output, retain_graph=True),
        torch.autograd.grad(expected, inputs, grad_output),
        strict=True,
    ):
        assert_close(grad_ours, grad_expected, dtype)


# --- focal -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [None, 0.25, "per-class"])
@pytest.mark.parametrize("spatial", [False, True])
def test_focal_matches_formula(reduction, gamma, alpha, spatial):
    logits, target = _problem(spatial=spatial)
    weight = torch.rand(C, dtype=torch.float64) + 0.2
    alpha_value = torch.rand(C, dtype=torch.float64) if alpha == "per-class" else alpha
    ours = xent.focal_loss(logits, target, gamma=gamma, alpha=alpha_value, weight=weight, reduction=reduction)
    p = _p_y(logits, target)
    per_element = -((1 - p) ** gamma) * torch.log(p)
    if alpha == "per-class":
        per_element = per_element * alpha_value[target.clamp_min(0)]
    elif alpha is not None:
        per_element = per_element * alpha
    _check(ours, _reduce(per_element, target, weight, reduction), (logits,))


def test_focal_gamma_zero_is_cross_entropy_and_never_exceeds_it():
    logits, target = _problem()
    _check(xent.focal_loss(logits, target, gamma=0.0), xent.cross_entropy(logits, target), (logits,))
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
    _check(ours, expected, (logits,))


def test_sigmoid_focal_gamma_zero_no_alpha_is_bce_and_extreme_logits_are_finite():
    logits = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    target = torch.randint(2, (N, C)).double()
    _check(
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


# --- poly-1 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("epsilon", [-1.0, 0.0, 1.0, 3.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_poly1_matches_formula(reduction, epsilon, smoothing):
    logits, target = _problem()
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
    _check(ours, expected, (logits,))


def test_poly1_epsilon_zero_is_cross_entropy():
    logits, target = _problem()
    _check(xent.poly1_cross_entropy(logits, target, epsilon=0.0), xent.cross_entropy(logits, target), (logits,))


# --- imbalance -------------------------------------------------------------------------------------------------


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
    logits, target = _problem(spatial=True)
    counts = torch.tensor([100.0, 50, 20, 10, 5, 1])
    log_prior = torch.log(counts.double() / counts.double().sum())
    adjusted = logits + tau * log_prior.view(1, C, 1)
    expected = F.cross_entropy(adjusted, target, reduction=reduction, label_smoothing=0.1)
    ours = xent.logit_adjusted_cross_entropy(
        logits, target, class_counts=counts, tau=tau, reduction=reduction, label_smoothing=0.1
    )
    _check(ours, expected, (logits,))
    post_hoc = xent.logit_adjust(logits.detach(), counts, tau=tau)
    torch.testing.assert_close(post_hoc, logits.detach() - tau * log_prior.view(1, C, 1))


def test_logit_adjust_identities():
    logits, target = _problem()
    counts = torch.tensor([100.0, 50, 20, 10, 5, 1])
    _check(
        xent.logit_adjusted_cross_entropy(logits, target, class_counts=counts, tau=0.0),
        xent.cross_entropy(logits, target),
        (logits,),
    )
    _check(
        xent.balanced_softmax_cross_entropy(logits, target, class_counts=counts),
        xent.logit_adjusted_cross_entropy(logits, target, class_counts=counts, tau=1.0),
        (logits,),
    )
    # Balanced softmax is CE on x + log n, written out.
    _check(
        xent.balanced_softmax_cross_entropy(logits, target, class_counts=counts, reduction="sum"),
        F.cross_entropy(logits + counts.double().log(), target, reduction="sum"),
        (logits,),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("max_margin", "scale"), [(0.5, 30.0), (0.0, 1.0), (1.0, 10.0)])
def test_ldam_matches_formula(reduction, max_margin, scale):
    logits, target = _problem()
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
    _check(ours, expected, (logits,))
    assert xent.ldam_margins(counts, max_margin).max().item() == pytest.approx(max_margin)


# --- noise-robust ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("q", [0.1, 0.7, 1.0])
def test_generalized_cross_entropy_matches_formula(reduction, q):
    logits, target = _problem(spatial=True)
    weight = torch.rand(C, dtype=torch.float64) + 0.2
    ours = xent.generalized_cross_entropy(logits, target, q=q, weight=weight, reduction=reduction)
    per_element = (1 - _p_y(logits, target) ** q) / q
    _check(ours, _reduce(per_element, target, weight, reduction), (logits,))


def test_generalized_cross_entropy_tends_to_cross_entropy_as_q_vanishes():
    logits, target = _problem()
    ce = xent.cross_entropy(logits, target)
    gce = xent.generalized_cross_entropy(logits, target, q=1e-7)
    torch.testing.assert_close(gce, ce, rtol=1e-5, atol=0)
    mae = xent.generalized_cross_entropy(logits, target, q=1.0, reduction="none")
    kept = target != -100
    torch.testing.assert_close(mae[kept], 1 - _p_y(logits, target)[kept])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("alpha", "beta", "log_zero"), [(0.1, 1.0, -4.0), (1.0, 0.5, -9.2), (0.0, 1.0, -1.0)])
def test_symmetric_cross_entropy_matches_formula(reduction, alpha, beta, log_zero):
    logits, target = _problem()
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
    ce = -torch.log(_p_y(logits, target))
    _check(ours, _reduce(alpha * ce + beta * rce, target, weight, reduction), (logits,))


# --- distillation and calibration ------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "batchmean", "mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("spatial", [False, True])
def test_distillation_matches_formula(reduction, temperature, spatial):
    student, _ = _problem(spatial=spatial)
    teacher = torch.randn_like(student.detach()) * 2
    ours = xent.distillation_loss(student, teacher, temperature=temperature, reduction=reduction)
    q = torch.softmax(teacher / temperature, 1)
    log_p = torch.log_softmax(student / temperature, 1)
    kl = (q * (q.log() - log_p)).sum(1) * temperature**2
    expected = {"none": kl, "batchmean": kl.sum() / N, "mean": kl.mean(), "sum": kl.sum()}[reduction]
    _check(ours, expected, (student,))
    torch_kl = F.kl_div(log_p, q, reduction="batchmean") * temperature**2 if not spatial else None
    if reduction == "batchmean" and torch_kl is not None:
        assert_close(ours, torch_kl)


def test_distillation_identities():
    student, target = _problem(ignore=False)
    one_hot = F.one_hot(target, C).double()
    _check(
        xent.distillation_loss(student, one_hot, teacher_is_probs=True),
        xent.cross_entropy(student, target) - 0.0,
        (student,),
    )
    teacher_logits = torch.randn(N, C, dtype=torch.float64)
    from_probs = xent.distillation_loss(
        student, torch.softmax(teacher_logits, 1), temperature=3.0, teacher_is_probs=True
    )
    from_logits = xent.distillation_loss(student, teacher_logits, temperature=3.0)
    assert_close(from_probs, from_logits)


def test_fit_temperature_minimises_nll():
    generator = torch.Generator().manual_seed(3)
    calibrated = torch.randn(4000, C, generator=generator, dtype=torch.float64) * 2
    target = torch.multinomial(torch.softmax(calibrated, 1), 1, generator=generator).squeeze(1)  # labels ~ model
    overconfident = calibrated * 3.0  # the same model made 3× too sharp
    temperature = xent.fit_temperature(overconfident, target).item()
    grid = torch.linspace(0.5, 6.0, 5501, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(overconfident / t, target) for t in grid])
    assert temperature == pytest.approx(grid[nll.argmin()].item(), abs=2e-3)
    assert 2.5 < temperature < 3.5
    assert F.cross_entropy(overconfident / temperature, target) < F.cross_entropy(overconfident, target)


# --- generative ------------------------------------------------------------------------------------------------


def test_gan_losses_match_formula():
    real = torch.randn(8, 1, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    expected = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    _check(xent.gan_discriminator_loss(real, fake), expected, (real, fake))
    smoothed = -(0.9 * torch.log(torch.sigmoid(real)) + 0.1 * torch.log(1 - torch.sigmoid(real))).sum()
    smoothed = smoothed - torch.log(1 - torch.sigmoid(fake)).sum()
    _check(xent.gan_discriminator_loss(real, fake, label_smoothing=0.1, reduction="sum"), smoothed, (real, fake))
    _check(xent.gan_generator_loss(fake), -torch.log(torch.sigmoid(fake)).mean(), (fake,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 1.0, 4.0])
def test_vae_loss_is_negative_elbo(reduction, beta):
    recon = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.rand(4, 1, 3, 3, dtype=torch.float64)
    mu = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    p = torch.sigmoid(recon)
    bce = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum((1, 2, 3))
    # KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ (σ² + μ² − 1 − log σ²), per sample.
    kl = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum(1)
    per_sample = bce + beta * kl
    expected = {"none": per_sample, "mean": per_sample.mean(), "sum": per_sample.sum()}[reduction]
    _check(xent.vae_loss(recon, x, mu, logvar, beta=beta, reduction=reduction), expected, (recon, mu, logvar))


# --- combining -------------------------------------------------------------------------------------------------


def test_weighted_sum_module_and_function():
    logits, target = _problem()
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
    _check(total, ce + 0.5 * focal + 2.0 * gce, (logits,))
    assert set(criterion.last_terms) == {"ce", "focal", "gce"}
    assert criterion.last_terms["focal"].item() == pytest.approx(focal.item())
    assert not criterion.last_terms["ce"].requires_grad
    assert_close(xent.weighted_sum({"a": ce, "b": focal}, {"a": 0.3, "b": 0.7}), 0.3 * ce + 0.7 * focal)


# --- gradcheck and modules -------------------------------------------------------------------------------------

GRADCHECKED = {
    "focal": lambda x, t: xent.focal_loss(x, t, gamma=1.5, alpha=0.5),
    "poly1": lambda x, t: xent.poly1_cross_entropy(x, t, epsilon=2.0, label_smoothing=0.1),
    "la": lambda x, t: xent.logit_adjusted_cross_entropy(x, t, class_counts=[5, 4, 3, 2, 1, 1]),
    "ldam": lambda x, t: xent.ldam_loss(x, t, class_counts=[5, 4, 3, 2, 1, 1], scale=2.0),
    "gce": lambda x, t: xent.generalized_cross_entropy(x, t, q=0.5),
    "sce": lambda x, t: xent.symmetric_cross_entropy(x, t),
    "distill": lambda x, t: xent.distillation_loss(x, torch.linspace(-2, 2, x.numel()).view_as(x), temperature=2.0),
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


MODULES = [
    (xent.nn.FocalLoss, {"gamma": 1.0, "alpha": torch.rand(C)}, xent.focal_loss),
    (xent.nn.Poly1CrossEntropyLoss, {"epsilon": 2.0}, xent.poly1_cross_entropy),
    (
        xent.nn.LogitAdjustedCrossEntropyLoss,
        {"class_counts": [6, 5, 4, 3, 2, 1], "tau": 0.5},
        xent.logit_adjusted_cross_entropy,
    ),
    (
        xent.nn.BalancedSoftmaxCrossEntropyLoss,
        {"class_counts": torch.arange(1.0, 7.0)},
        xent.balanced_softmax_cross_entropy,
    ),
    (xent.nn.LDAMLoss, {"class_counts": [6, 5, 4, 3, 2, 1]}, xent.ldam_loss),
    (xent.nn.GeneralizedCrossEntropyLoss, {"q": 0.3}, xent.generalized_cross_entropy),
    (xent.nn.SymmetricCrossEntropyLoss, {"alpha": 0.5}, xent.symmetric_cross_entropy),
]


@pytest.mark.parametrize(("module", "options", "function"), MODULES)
def test_modules_equal_functionals(module, options, function):
    logits, target = _problem(dtype=torch.float32)
    loss_fn = module(**options)
    assert torch.equal(loss_fn(logits, target), function(logits, target, **options))
    for name in ("class_counts", "alpha"):
        if isinstance(options.get(name), (torch.Tensor, list)):
            assert name in dict(loss_fn.named_buffers())


def test_other_modules_equal_functionals():
    student = torch.randn(4, 5)
    teacher = torch.randn(4, 5)
    assert torch.equal(
        xent.nn.DistillationLoss(temperature=2.0)(student, teacher),
        xent.distillation_loss(student, teacher, temperature=2.0),
    )
    binary, target = torch.randn(4, 3), torch.rand(4, 3)
    assert torch.equal(
        xent.nn.SigmoidFocalLoss(gamma=1.0)(binary, target), xent.sigmoid_focal_loss(binary, target, gamma=1.0)
    )
    assert torch.equal(
        xent.nn.GANDiscriminatorLoss(0.1)(binary, student),
        xent.gan_discriminator_loss(binary, student, label_smoothing=0.1),
    )
    assert torch.equal(xent.nn.GANGeneratorLoss()(binary), xent.gan_generator_loss(binary))
    mu, logvar = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.equal(
        xent.nn.VAELoss(beta=2.0)(binary, target, mu, logvar), xent.vae_loss(binary, target, mu, logvar, beta=2.0)
    )
    assert "temperature=2.0" in repr(xent.nn.DistillationLoss(temperature=2.0))


# --- errors ----------------------------------------------------------------------------------------------------

LOGITS, TARGET = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
COUNTS = [10, 5, 1]


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
        (lambda: xent.generalized_cross_entropy(LOGITS, TARGET, q=0.0), ValueError, r"q must be in \(0, 1\], got 0"),
        (lambda: xent.generalized_cross_entropy(LOGITS, TARGET, q=1.5), ValueError, r"q must be in \(0, 1\], got 1.5"),
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
        (
            lambda: xent.poly1_cross_entropy(LOGITS, TARGET, epsilon=-1.5),
            ValueError,
            r"epsilon must be in \[-1, inf\], got -1.5",
        ),
        (lambda: xent.symmetric_cross_entropy(LOGITS, TARGET, log_zero=0.0), ValueError, r"log_zero must be in"),
        (
            lambda: xent.distillation_loss(LOGITS, LOGITS, temperature=0.0),
            ValueError,
            r"temperature must be in \(0, inf\], got 0",
        ),
        (
            lambda: xent.distillation_loss(LOGITS, LOGITS[:2]),
            ValueError,
            r"teacher has shape \(2, 3\) but student_logits has shape \(4, 3\)",
        ),
        (lambda: xent.distillation_loss(LOGITS, LOGITS, reduction="avg"), ValueError, r"'batchmean'"),
        (
            lambda: xent.vae_loss(LOGITS, torch.rand(4, 3), torch.randn(4, 2), torch.randn(4, 3)),
            ValueError,
            r"logvar has shape",
        ),
        (
            lambda: xent.vae_loss(LOGITS, torch.rand(4, 3), torch.randn(4, 2), torch.randn(4, 2), beta=-1),
            ValueError,
            r"beta must be in",
        ),
        (
            lambda: xent.gan_discriminator_loss(LOGITS, LOGITS, reduction="none"),
            ValueError,
            r"reduction must be one of 'mean', 'sum'",
        ),
        (lambda: xent.fit_temperature(LOGITS, TARGET, min_temperature=0), ValueError, r"min_temperature must be in"),
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
