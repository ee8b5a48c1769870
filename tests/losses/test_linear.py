"""The linear-head losses' public functions (xent.losses.linear): the checks of linear_cross_entropy's arguments, the
target kinds of linear_loss, and what a head with no features computes. The fused kernels behind them are tested in
tests/kernels/test_linear.py."""

import pytest
import torch
import torch.nn.functional as F

import xent
from tests import family_samples
from tests.conftest import assert_close

N, D, V = 23, 6, 13


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"linear_weight": torch.randn(V, D + 1)}, ValueError, r"linear_weight has shape \(13, 7\).*expected \(V, 6\)"),
        ({"linear_weight": torch.randn(V, D).double()}, TypeError, r"linear_weight has dtype torch.float64"),
        ({"linear_bias": torch.randn(V + 1)}, ValueError, r"linear_bias must have shape \(13,\), got shape \(14,\)"),
        ({"target": torch.randint(V, (N, 2))}, ValueError, r"target has shape \(23, 2\).*expected \(23,\) class"),
        ({"target": torch.rand(N)}, TypeError, r"must have an integer dtype"),
        ({"target": torch.full((N,), V)}, ValueError, r"class index 13, outside \[0, 13\)"),
        ({"chunk_size": 0}, ValueError, r"chunk_size must be a positive int or None, got 0"),
        ({"weight_grad_dtype": "float32"}, TypeError, r"weight_grad_dtype must be a torch.dtype or None, got 'flo"),
        ({"weight_grad_dtype": torch.int32}, ValueError, r"weight_grad_dtype must be a floating-point dtype, got"),
        ({"reduction": "batchmean"}, ValueError, r"reduction must be one of"),
        ({"impl": "triton!"}, ValueError, r"impl must be one of"),
        ({"weight": torch.ones(V - 1)}, ValueError, r"weight must have shape \(13,\)"),
    ],
)
def test_bad_input(kwargs, error, match):
    arguments = {
        "input": torch.randn(N, D),
        "linear_weight": torch.randn(V, D),
        "target": torch.randint(V, (N,)),
        **kwargs,
    }
    with pytest.raises(error, match=match):
        xent.linear_cross_entropy(**arguments)


def test_linear_loss_probability_targets_are_cross_entropys_alone():
    tensors = family_samples.head_problem(torch.float64)
    del tensors["token_weight"], tensors["weight"]
    probabilities = torch.softmax(torch.randn(2, 5, family_samples.C, dtype=torch.float64), -1)
    with pytest.raises(TypeError, match="focal_loss takes class indices"):
        xent.linear_loss(xent.focal_loss, **{**tensors, "target": probabilities})
    # cross-entropy alone takes probabilities, and linear_cross_entropy is linear_loss(cross_entropy)
    assert_close(
        xent.linear_loss(xent.cross_entropy, **{**tensors, "target": probabilities}, label_smoothing=0.1),
        xent.linear_cross_entropy(**{**tensors, "target": probabilities}, label_smoothing=0.1),
    )


def test_a_linear_head_with_no_features_has_the_bias_as_logits():
    """input (N, 0) used to fail in reshape(-1, 0) with a RuntimeError; its logits are the bias (found by the fuzz
    layer)."""
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 1])
    loss = xent.linear_cross_entropy(torch.zeros(3, 0, dtype=torch.float64), torch.zeros(4, 0, dtype=torch.float64),
                                     target, linear_bias=bias)  # fmt: skip
    expected = F.cross_entropy(bias.expand(3, 4), target)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(*(torch.autograd.grad(value, bias)[0] for value in (loss, expected)))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: xent.linear_cross_entropy(torch.zeros(3, 2), False, torch.zeros(3)), r"^linear_weight must be a"),
    ],
)
def test_errors_name_the_callers_argument(call, message):
    """Found by the fuzz layer: each error names the argument as the caller wrote it."""
    with pytest.raises((ValueError, TypeError), match=message):
        call()
