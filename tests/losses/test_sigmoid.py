"""Binary cross-entropy against torch.nn.functional, label smoothing against its formula, and its errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.conftest import assert_close

REDUCTIONS = ("none", "mean", "sum")
BROADCASTS = {  # weight / pos_weight shapes against input (6, 5)
    "none": None,
    "per-class": (5,),
    "per-row": (6, 1),
    "full": (6, 5),
}


def _pair(dtype, shape=(6, 5)):
    logits = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    target = torch.rand(shape, dtype=dtype)
    if target.dim():
        target[0] = target[0].round()  # hard labels too
    return logits, target


def _check(ours, theirs, inputs, dtype):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_close(ours, theirs, dtype)
    grad_output = torch.randn_like(ours)
    for grad_ours, grad_theirs in zip(
        torch.autograd.grad(ours, inputs, grad_output), torch.autograd.grad(theirs, inputs, grad_output), strict=True
    ):
        assert_close(grad_ours, grad_theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight_shape", list(BROADCASTS))
@pytest.mark.parametrize("pos_weight_shape", list(BROADCASTS))
def test_with_logits_matches_torch(dtype, reduction, weight_shape, pos_weight_shape):
    logits, target = _pair(dtype)
    target.requires_grad_()
    weight = None if BROADCASTS[weight_shape] is None else torch.rand(BROADCASTS[weight_shape], dtype=dtype)
    pos = BROADCASTS[pos_weight_shape]
    pos_weight = None if pos is None else torch.rand(pos, dtype=dtype) * 3
    kwargs = {"weight": weight, "pos_weight": pos_weight, "reduction": reduction}
    ours = xent.binary_cross_entropy_with_logits(logits, target, **kwargs)
    theirs = F.binary_cross_entropy_with_logits(logits, target, **kwargs)
    _check(ours, theirs, (logits, target), dtype)


@pytest.mark.parametrize("shape", [(), (9,), (3, 4, 5)])
def test_with_logits_any_shape(shape):
    logits, target = _pair(torch.float64, shape)
    _check(
        xent.binary_cross_entropy_with_logits(logits, target, reduction="none"),
        F.binary_cross_entropy_with_logits(logits, target, reduction="none"),
        (logits,),
        torch.float64,
    )


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0])
def test_with_logits_label_smoothing_moves_targets_towards_one_half(epsilon):
    logits, target = _pair(torch.float64)
    pos_weight = torch.rand(5, dtype=torch.float64) * 3
    ours = xent.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, label_smoothing=epsilon)
    smoothed = target * (1 - epsilon) + epsilon / 2
    theirs = F.binary_cross_entropy_with_logits(logits, smoothed, pos_weight=pos_weight)
    _check(ours, theirs, (logits,), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight_shape", ["none", "per-class", "full"])
def test_probabilities_match_torch(dtype, reduction, weight_shape):
    logits, target = _pair(dtype)
    probs = torch.sigmoid(logits.detach()).requires_grad_()
    weight = None if BROADCASTS[weight_shape] is None else torch.rand(BROADCASTS[weight_shape], dtype=dtype)
    ours = xent.binary_cross_entropy(probs, target, weight=weight, reduction=reduction)
    theirs = F.binary_cross_entropy(probs, target, weight=weight, reduction=reduction)
    _check(ours, theirs, (probs,), dtype)


def test_probabilities_at_zero_and_one_match_torch_clamp():
    probs = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3], dtype=torch.float64, requires_grad=True)
    ours = xent.binary_cross_entropy(probs, target, reduction="none")
    theirs = F.binary_cross_entropy(probs, target, reduction="none")
    assert ours[0].item() == 100.0  # the log is clamped at -100
    _check(ours, theirs, (probs,), torch.float64)
    # The target's gradient uses the same clamped logs: finite where PyTorch's is ±inf.
    ours = xent.binary_cross_entropy(probs, target, reduction="none")
    (grad_target,) = torch.autograd.grad(ours.sum(), target)
    assert grad_target.tolist()[:4] == [100.0, -100.0, 100.0, -100.0]


def test_probabilities_label_smoothing():
    probs = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(2, (4, 3)).double()
    ours = xent.binary_cross_entropy(probs, target, label_smoothing=0.2)
    theirs = F.binary_cross_entropy(probs, target * 0.8 + 0.1)
    _check(ours, theirs, (probs,), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_extreme_logits_are_finite_and_exact(dtype):
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0]).to(dtype).requires_grad_()
    target = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]).to(dtype)
    loss = xent.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=torch.tensor(2.0))
    loss.sum().backward()
    expected = torch.tensor([1e4, 2e4, 0.0, 0.0, 2 * 0.6931471805599453])
    torch.testing.assert_close(loss.float(), expected.to(dtype).float())
    torch.testing.assert_close(logits.grad.float(), torch.tensor([1.0, -2.0, 0.0, 0.0, -1.0]).to(dtype).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype(dtype):
    logits, target = _pair(dtype)
    loss = xent.binary_cross_entropy_with_logits(logits, target)
    assert loss.dtype == dtype
    expected = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    torch.testing.assert_close(loss, expected.to(dtype))


def test_gradcheck():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    pos_weight = torch.rand(4, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, 1, dtype=torch.float64)

    def loss(x, t, p):
        return xent.binary_cross_entropy_with_logits(x, t, weight=weight, pos_weight=p, label_smoothing=0.1)

    assert torch.autograd.gradcheck(loss, (logits, target, pos_weight))
    probs = torch.rand(3, 4, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t: xent.binary_cross_entropy(p, t, weight=weight), (probs, target))


def test_binary_cross_entropy_with_logits_is_exact_in_float64_beyond_softplus_threshold():
    """F.softplus returns x itself above 20: softplus(25) came out 1.4e-11 short, and its gradient exactly 1 (found
    by the fuzz layer)."""
    x = torch.tensor([25.0, 30.0, -25.0], dtype=torch.float64, requires_grad=True)
    loss = xent.binary_cross_entropy_with_logits(x, torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64), reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    expected = sum(
        math.log1p(math.exp(-abs(v))) + max(v, 0.0) - t * v for v, t in ((25.0, 0.0), (30.0, 0.3), (-25.0, 1.0))
    )
    assert loss.item() == pytest.approx(expected, rel=1e-15)
    assert grad[0].item() == pytest.approx(1 / (1 + math.exp(-25.0)), rel=1e-15) and grad[0].item() != 1.0


# --- errors: named arguments, shown values and shapes ----------------------------------------------------------

BINARY = torch.randn(8, 5)
BINARY_TARGET = torch.rand(8, 5)


@pytest.mark.parametrize(
    ("fn", "kwargs", "error", "match"),
    [
        ("with_logits", {"reduction": "batchmean"}, ValueError, r"reduction must be one of"),
        ("with_logits", {"label_smoothing": 2}, ValueError, r"label_smoothing must be in \[0, 1\], got 2"),
        ("with_logits", {"pos_weight": torch.ones(4)}, ValueError, r"pos_weight of shape \(4,\) does not broadcast"),
        ("with_logits", {"pos_weight": torch.ones(2, 8, 5)}, ValueError, r"pos_weight of shape \(2, 8, 5\)"),
        ("with_logits", {"weight": torch.ones(3, 1)}, ValueError, r"weight of shape \(3, 1\) does not broadcast"),
        ("with_logits", {"target": torch.rand(8, 4)}, ValueError, r"target has shape \(8, 4\) but input has shape"),
        ("with_logits", {"target": BINARY_TARGET + 1}, ValueError, r"target must hold probabilities in \[0, 1\]"),
        ("with_logits", {"target": torch.ones(8, 5, dtype=torch.long)}, TypeError, r"target must be a floating"),
        ("with_logits", {"input": torch.ones(8, 5, dtype=torch.long)}, TypeError, r"input must be a floating"),
        ("probs", {"input": torch.rand(8, 5) * 2}, ValueError, r"input must hold probabilities in \[0, 1\], found"),
        ("probs", {"target": -BINARY_TARGET - 0.1}, ValueError, r"target must hold probabilities in \[0, 1\]"),
        ("probs", {"weight": torch.ones(7)}, ValueError, r"weight of shape \(7,\) does not broadcast"),
    ],
)
def test_binary_bad_input(fn, kwargs, error, match):
    arguments = {"input": torch.rand(8, 5) if fn == "probs" else BINARY, "target": BINARY_TARGET, **kwargs}
    function = xent.binary_cross_entropy if fn == "probs" else xent.binary_cross_entropy_with_logits
    with pytest.raises(error, match=match):
        function(**arguments)
