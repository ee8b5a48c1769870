"""Identities of cross-entropy that hold for any input (hypothesis draws the shapes, options and values)."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import xent

TOL = {"rtol": 1e-9, "atol": 1e-12}


@st.composite
def problems(draw):
    """Logits (N, C) in float64, class indices with some ignored, and options."""
    n = draw(st.integers(1, 12))
    c = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64) * scale
    target = torch.randint(c, (n,), generator=generator)
    ignored = torch.rand(n, generator=generator) < draw(st.sampled_from([0.0, 0.3]))
    target[ignored] = -100
    options = {
        "reduction": draw(st.sampled_from(["none", "mean", "sum"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.7])),
        "z_loss": draw(st.sampled_from([0.0, 1e-3])),
        "softcap": draw(st.sampled_from([None, 5.0])),
    }
    return logits, target, options


def _value_and_grad(logits, target, **kwargs):
    logits = logits.detach().requires_grad_()
    loss = xent.cross_entropy(logits, target, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    return loss.detach(), grad


@settings(max_examples=60, deadline=None)
@given(problems())
def test_one_hot_probabilities_equal_class_indices(problem):
    logits, target, options = problem
    keep = target != -100
    logits, target = logits[keep], target[keep]
    one_hot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    for expected, actual in zip(
        _value_and_grad(logits, target, **options), _value_and_grad(logits, one_hot, **options), strict=True
    ):
        torch.testing.assert_close(actual, expected, **TOL)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_weights_of_ones_equal_no_weights(problem):
    logits, target, options = problem
    ones = torch.ones(logits.shape[1], dtype=logits.dtype)
    for expected, actual in zip(
        _value_and_grad(logits, target, **options), _value_and_grad(logits, target, weight=ones, **options), strict=True
    ):
        torch.testing.assert_close(actual, expected, **TOL)


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(0.1, 10.0))
def test_ignored_targets_equal_slicing_them_out(problem, weight_scale):
    logits, target, options = problem
    if options["reduction"] == "none":
        options["reduction"] = "sum"
    weight = torch.rand(logits.shape[1], dtype=logits.dtype) * weight_scale + 0.01
    keep = target != -100
    full, full_grad = _value_and_grad(logits, target, weight=weight, **options)
    sliced, sliced_grad = _value_and_grad(logits[keep], target[keep], weight=weight, **options)
    torch.testing.assert_close(full, sliced, **TOL)
    torch.testing.assert_close(full_grad[keep], sliced_grad, **TOL)
    assert torch.all(full_grad[~keep] == 0)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_zero_smoothing_equals_plain(problem):
    logits, target, options = problem
    options.pop("label_smoothing")
    for expected, actual in zip(
        _value_and_grad(logits, target, **options),
        _value_and_grad(logits, target, label_smoothing=0.0, **options),
        strict=True,
    ):
        torch.testing.assert_close(actual, expected, **TOL)
    if (target != -100).any():  # PyTorch returns NaN when nothing is left to average
        plain = {key: value for key, value in options.items() if key not in ("z_loss", "softcap")}
        torch.testing.assert_close(
            xent.cross_entropy(logits, target, **plain), F.cross_entropy(logits, target, **plain), **TOL
        )


@settings(max_examples=40, deadline=None)
@given(problems())
def test_k_dimensional_equals_flattened(problem):
    """(N, C, d) input is (N·d, C) input with the class dimension moved last."""
    logits, target, options = problem
    n, c = logits.shape
    spatial = logits.reshape(1, n, c).permute(0, 2, 1)  # (1, C, N)
    flat, flat_grad = _value_and_grad(logits, target, **options)
    loss, grad = _value_and_grad(spatial, target.reshape(1, n), **options)
    torch.testing.assert_close(loss.reshape(flat.shape), flat, **TOL)
    torch.testing.assert_close(grad.permute(0, 2, 1).reshape(n, c), flat_grad, **TOL)
