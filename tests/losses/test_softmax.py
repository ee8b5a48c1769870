"""cross_entropy against torch.nn.functional.cross_entropy, and against the formula where PyTorch has no equal."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.conftest import assert_close

SHAPES = {  # input shape, class dimension
    "C": ((7,), 0),
    "NC": ((13, 7), 1),
    "NCd": ((5, 7, 3), 1),
    "NCdd": ((3, 7, 2, 5), 1),
}
REDUCTIONS = ("none", "mean", "sum")


def _make(shape_name, dtype, *, ignore_some=False):
    shape, class_dim = SHAPES[shape_name]
    num_classes = shape[class_dim]
    logits = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    batch_shape = shape[:class_dim] + shape[class_dim + 1 :]
    target = torch.randint(num_classes, batch_shape)
    if ignore_some and target.numel() > 1:
        target.view(-1)[::3] = -100
    return logits, target, num_classes


def _grads(loss, inputs, reduction):
    # "none" is checked with an arbitrary grad_output, so per-element gradients are tested, not just their sum.
    grad_output = torch.randn_like(loss) if reduction == "none" else torch.ones_like(loss)
    return torch.autograd.grad(loss, inputs, grad_output)


def _compare(kwargs_ours, kwargs_torch, logits, target, reduction, dtype):
    ours = xent.cross_entropy(logits, target, reduction=reduction, **kwargs_ours)
    theirs = F.cross_entropy(logits, target, reduction=reduction, **kwargs_torch)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert_close(ours, theirs, dtype)
    torch.manual_seed(1)
    (grad_ours,) = _grads(ours, logits, reduction)
    torch.manual_seed(1)
    (grad_theirs,) = _grads(theirs, logits, reduction)
    assert_close(grad_ours, grad_theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    ("use_weight", "ignore", "smoothing"), list(itertools.product([False, True], [False, True], [0.0, 0.25]))
)
def test_class_indices_match_torch(dtype, shape_name, reduction, use_weight, ignore, smoothing):
    logits, target, num_classes = _make(shape_name, dtype, ignore_some=ignore)
    weight = torch.rand(num_classes, dtype=dtype) + 0.1 if use_weight else None
    kwargs = {"weight": weight, "label_smoothing": smoothing}
    _compare(kwargs, kwargs, logits, target, reduction, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("use_weight", "smoothing"), list(itertools.product([False, True], [0.0, 0.3])))
def test_probability_targets_match_torch(dtype, shape_name, reduction, use_weight, smoothing):
    shape, class_dim = SHAPES[shape_name]
    logits, _, num_classes = _make(shape_name, dtype)
    probs = torch.softmax(torch.randn(shape, dtype=dtype), dim=class_dim)
    weight = torch.rand(num_classes, dtype=dtype) + 0.1 if use_weight else None
    kwargs = {"weight": weight, "label_smoothing": smoothing}
    _compare(kwargs, kwargs, logits, probs, reduction, dtype)


@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
def test_custom_ignore_index_matches_torch(ignore_index):
    logits, target, _ = _make("NCd", torch.float64)
    target.view(-1)[::2] = ignore_index
    kwargs = {"ignore_index": ignore_index}
    _compare(kwargs, kwargs, logits, target, "mean", torch.float64)


def _z_softcap_reference(logits, target, weight, reduction, smoothing, z_loss, softcap, ignore_index=-100):
    """PaLM's z-loss and Gemma 2's soft cap written plainly on top of PyTorch's cross-entropy."""
    capped = softcap * torch.tanh(logits / softcap) if softcap else logits
    ce = F.cross_entropy(capped, target, weight=weight, reduction="none", label_smoothing=smoothing)
    lse = torch.logsumexp(capped, dim=1)
    valid = (target != ignore_index).to(logits.dtype)
    target_weight = weight[target.clamp_min(0)] if weight is not None else torch.ones_like(valid)
    per_element = ce + z_loss * lse**2 * target_weight * valid
    if reduction == "none":
        return per_element
    if reduction == "sum":
        return per_element.sum()
    return per_element.sum() / (target_weight * valid).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("z_loss", "softcap"), [(1e-2, None), (0.0, 2.5), (1e-3, 4.0)])
@pytest.mark.parametrize("use_weight", [False, True])
def test_z_loss_and_softcap_match_formula(dtype, reduction, z_loss, softcap, use_weight):
    logits, target, num_classes = _make("NCd", dtype, ignore_some=True)
    weight = torch.rand(num_classes, dtype=dtype) + 0.1 if use_weight else None
    ours = xent.cross_entropy(
        logits, target, weight=weight, reduction=reduction, label_smoothing=0.1, z_loss=z_loss, softcap=softcap
    )
    expected = _z_softcap_reference(logits, target, weight, reduction, 0.1, z_loss, softcap)
    assert_close(ours, expected, dtype)
    torch.manual_seed(1)
    (grad_ours,) = _grads(ours, logits, reduction)
    torch.manual_seed(1)
    (grad_expected,) = _grads(expected, logits, reduction)
    assert_close(grad_ours, grad_expected, dtype)


def test_z_loss_with_probability_targets_matches_formula():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1)
    ours = xent.cross_entropy(logits, probs, z_loss=0.05)
    expected = (-(probs * logits.log_softmax(-1)).sum(-1) + 0.05 * torch.logsumexp(logits, -1) ** 2).mean()
    assert_close(ours, expected)


@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_mean_with_every_target_ignored_is_zero_with_zero_gradient(use_weight, smoothing):
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64) if use_weight else None
    target = torch.full((4,), -100)
    loss = xent.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing, z_loss=1e-3)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert torch.isnan(F.cross_entropy(logits, target))  # the documented difference


def test_mean_of_empty_batch_is_zero():
    logits = torch.randn(0, 5, requires_grad=True)
    loss = xent.cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision_is_accumulated_in_float32(dtype, reduction):
    logits = (torch.randn(64, 300) * 4).to(dtype).requires_grad_()
    target = torch.randint(300, (64,))
    loss = xent.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
    assert loss.dtype == dtype
    upcast = logits.detach().float().requires_grad_()
    expected = F.cross_entropy(upcast, target, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected.to(dtype))
    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(logits.grad, upcast.grad.to(dtype))  # within one rounding of the half dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_extreme_logits_are_finite_and_correct(dtype, softcap):
    base = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, 1e4], [1e4, 1e4, -1e4, -1e4]])
    logits = base.to(dtype).requires_grad_()
    target = torch.tensor([1, 3, 0])
    loss = xent.cross_entropy(logits, target, reduction="none", label_smoothing=0.1, softcap=softcap, z_loss=1e-4)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    reference = base.to(dtype).double().detach().requires_grad_()
    expected = _z_softcap_reference(reference, target, None, "none", 0.1, 1e-4, softcap)
    expected.sum().backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=1e-2, atol=1e-2)


def test_wide_bfloat16_row_agrees_with_float32():
    logits = (torch.randn(4, 50_000) * 5).to(torch.bfloat16)
    target = torch.randint(50_000, (4,))
    ours = xent.cross_entropy(logits, target, reduction="none").float()
    expected = F.cross_entropy(logits.float(), target, reduction="none")
    torch.testing.assert_close(ours, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("probabilities", [False, True])
def test_gradcheck(probabilities):
    logits = torch.randn(4, 5, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    if probabilities:
        target = torch.softmax(torch.randn(4, 5, 2, dtype=torch.float64), 1)
    else:
        target = torch.randint(5, (4, 2))
        target[0, 0] = -100

    def loss(x):
        return xent.cross_entropy(x, target, weight=weight, label_smoothing=0.2, z_loss=0.01, softcap=3.0)

    assert torch.autograd.gradcheck(loss, (logits,))


def test_module_equals_functional_and_stores_its_options():
    weight = torch.rand(7) + 0.5
    module = xent.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, ignore_index=2)
    logits, target, _ = _make("NC", torch.float32)
    expected = xent.cross_entropy(
        logits, target, weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, ignore_index=2
    )
    assert torch.equal(module(logits, target), expected)
    assert "weight" in dict(module.named_buffers())
    assert module.to(torch.float64).weight.dtype == torch.float64
    assert "label_smoothing=0.1" in repr(module) and "softcap=20.0" in repr(module)
