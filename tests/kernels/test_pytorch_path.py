"""The automatic choice's PyTorch path (xent.kernels.dispatch.plain_cross_entropy, pytorch_agrees): a small plain
cross-entropy on the CPU runs F.cross_entropy itself, only where that is exactly xent's loss — and every case where
xent deliberately differs (docs: differences) or PyTorch cannot differentiate takes xent's own definition, never the
fused kernel (so that second-order gradients never depend on a batch's values). Both sides are checked
against xent's reference (impl="reference") on the grid of options × reductions × dtypes × ignore patterns × which
tensors require grad, first and second order."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import xent
from xent.core.rowloss import FocalTerm, RowLoss
from xent.kernels import dispatch

C = 7


def _chosen(logits, target, reduction="mean", **options):
    return dispatch.choose("logits", None, logits, target, RowLoss(**options), reduction=reduction)


def _problem(dtype, ignore, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, C, generator=generator, dtype=dtype) * 3
    target = torch.randint(C, (12,), generator=generator)
    if ignore in ("some", "nan"):
        target[[2, 7]] = -100
    if ignore == "nan":
        logits[2] = math.nan
        logits[7, 3] = math.inf
    if ignore == "all":
        target[:] = -100
    return logits, target


GRID = list(
    itertools.product(
        (torch.float32, torch.float64),
        ("none", "some", "nan", "all"),
        (None, "weight", "zero-weight"),
        (0.0, 0.2),
        ("mean", "sum", "none"),
    )
)


@pytest.mark.parametrize(("dtype", "ignore", "weights", "smoothing", "reduction"), GRID)
def test_the_automatic_choice_equals_the_reference(dtype, ignore, weights, smoothing, reduction):
    logits, target = _problem(dtype, ignore)
    weight = None
    if weights is not None:
        weight = torch.rand(C, dtype=dtype) + 0.5
        if weights == "zero-weight":  # every kept target has weight 0: a weighted mean over nothing
            weight[target[target != -100].unique()] = 0.0
    options = dict(weight=weight, reduction=reduction, label_smoothing=smoothing)
    expected_path = ignore not in ("nan", "all") and not (
        weights == "zero-weight" and reduction == "mean"
    )  # PyTorch's own only where it is exactly xent's
    assert (_chosen(logits, target, reduction, weight=weight, label_smoothing=smoothing) == "pytorch") is expected_path
    leaf, reference_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = xent.cross_entropy(leaf, target, **options)
    expected = xent.cross_entropy(reference_leaf, target, impl="reference", **options)
    tolerance = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss, expected, **tolerance)
    grad_output = torch.rand_like(loss) + 0.5
    (gradient,) = torch.autograd.grad(loss, leaf, grad_output, create_graph=True)
    (expected_gradient,) = torch.autograd.grad(expected, reference_leaf, grad_output, create_graph=True)
    torch.testing.assert_close(gradient, expected_gradient, **tolerance)
    assert gradient.isfinite().all()  # a NaN ignored row is absent, whichever path ran
    # second order (a gradient penalty): both paths differentiate their gradient
    direction = torch.randn_like(logits)
    (second,) = torch.autograd.grad((gradient * direction).sum(), leaf)
    (expected_second,) = torch.autograd.grad((expected_gradient * direction).sum(), reference_leaf)
    torch.testing.assert_close(second, expected_second, **tolerance)
    if expected_path:  # and it is PyTorch's own, bit for bit
        direct = F.cross_entropy(logits, target, weight=weight, reduction=reduction, label_smoothing=smoothing)
        torch.testing.assert_close(loss.detach(), direct, rtol=0, atol=0)


def test_an_infinite_class_weight_takes_the_reference():
    """PyTorch's label-smoothing term multiplies an ignored row by the weights before masking it: 0 · inf in its
    gradient. xent's ignored row stays absent."""
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target, weight = torch.tensor([0, -100, 0, -100]), torch.tensor([1.0, 2.0, math.inf], dtype=torch.float64)
    assert _chosen(logits, target, weight=weight, label_smoothing=0.1) == "reference"
    xent.cross_entropy(logits, target, weight=weight, label_smoothing=0.1).backward()
    assert torch.equal(logits.grad[[1, 3]], torch.zeros(2, 3, dtype=torch.float64))


def test_second_order_does_not_depend_on_the_batch():
    """Between 65,536 and 262,144 logits a plain call takes PyTorch's path or, where PyTorch differs, xent's
    definition — never the fused kernel, which cannot be differentiated twice."""
    logits = torch.randn(256, 512, dtype=torch.float64, requires_grad=True)
    for target in (torch.randint(512, (256,)), torch.full((256,), -100)):
        (gradient,) = torch.autograd.grad(xent.cross_entropy(logits, target), logits, create_graph=True)
        (second,) = torch.autograd.grad((gradient * gradient).sum(), logits)
        assert second.isfinite().all()


def test_per_sample_gradients_under_vmap():
    """A torch.func transform reads no value on the host: such calls keep xent's definition (with value checks off,
    as vmap needs)."""
    logits, target = _problem(torch.float64, "some")
    per_sample = torch.func.vmap(torch.func.grad(lambda x, t: xent.cross_entropy(x, t)))
    with xent.value_checks(False):
        got = per_sample(logits, target)
    for row in range(logits.shape[0]):
        leaf = logits[row].clone().requires_grad_()
        xent.cross_entropy(leaf, target[row], impl="reference").backward()
        torch.testing.assert_close(got[row], leaf.grad)


def test_a_class_weight_that_requires_grad_takes_the_reference():
    """PyTorch refuses to differentiate a class weight with class indices; xent differentiates it."""
    logits, target = _problem(torch.float64, "some")
    weight = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    assert _chosen(logits, target, weight=weight) == "reference"
    with torch.no_grad():
        assert _chosen(logits, target, weight=weight) == "pytorch"
    xent.cross_entropy(logits, target, weight=weight).backward()
    expected_weight = weight.detach().clone().requires_grad_()
    xent.cross_entropy(logits, target, weight=expected_weight, impl="reference").backward()
    torch.testing.assert_close(weight.grad, expected_weight.grad)


@pytest.mark.parametrize(
    "case",
    ["half", "bfloat16", "probabilities", "z_loss", "softcap", "token_weight", "weight dtype", "focal", "large"],
)
def test_what_pytorch_does_not_compute_takes_xents_own_path(case):
    logits, target = _problem(torch.float32, "none")
    options = {}
    if case in ("half", "bfloat16"):
        logits = logits.to(torch.float16 if case == "half" else torch.bfloat16)
    elif case == "probabilities":
        target = torch.softmax(torch.randn(12, C), dim=1)
    elif case in ("z_loss", "softcap"):
        options = {case: 1e-3 if case == "z_loss" else 30.0}
    elif case == "token_weight":
        options = {"token_weight": torch.rand(12)}
    elif case == "weight dtype":
        options = {"weight": torch.rand(C, dtype=torch.float64)}
    elif case == "focal":
        options = {"term": FocalTerm(gamma=2.0)}
    elif case == "large":
        logits = torch.randn(dispatch.PYTORCH_MAX_ELEMENTS // 64 + 1, 64)
        target = torch.randint(64, (logits.shape[0],))
    assert _chosen(logits, target, **options) != "pytorch"
    assert _chosen(torch.randn(12, C), torch.randint(C, (12,))) == "pytorch"  # the same call, plain


def test_the_module_and_a_training_step_take_it_too():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, C, dtype=torch.float64)
    inputs, target = torch.randn(32, 5, dtype=torch.float64), torch.randint(C, (32,))
    criterion = xent.nn.CrossEntropyLoss(label_smoothing=0.1)
    criterion(model(inputs), target).backward()
    got = model.weight.grad.clone()
    model.zero_grad()
    F.cross_entropy(model(inputs), target, label_smoothing=0.1).backward()
    torch.testing.assert_close(got, model.weight.grad, rtol=0, atol=0)
