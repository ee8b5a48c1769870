"""An ignored row is absent whatever it holds: every implementation of every fused loss gives, for logits (or a
linear head's hidden states) whose ignored rows hold NaN, ±inf or a masked class at the placeholder target, the
loss and gradients of the same call on the kept rows alone (the identity "ignore mask ≡ slicing")."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import xent
from tests import family_samples
from xent.losses.family import FAMILY

IMPLS = ["reference", "chunked"] + (["triton"] if importlib.util.find_spec("triton") else [])
POISONS = ["nan", "inf", "-inf row", "masked class 0"]
C = 11


def _poisoned(poison: str, x: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    if poison == "nan":
        x[ignored, 3] = float("nan")
    elif poison == "inf":
        x[ignored, 5] = float("inf")
    elif poison == "-inf row":
        x[ignored] = -float("inf")
    else:  # an action mask on class 0, the placeholder the kernels read an ignored row's target at
        x[:, 0] = -float("inf")
    return x


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Against a float64 expectation: exact in float64; in float32 (Triton) the rounding of logits up to ~30."""
    tolerance = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(actual.double(), expected, **tolerance)


def _dtype(impl: str) -> torch.dtype:
    return torch.float32 if impl == "triton" else torch.float64  # Triton computes in float32


def _case(name: str):
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(1, C, (13,), generator=generator)  # never class 0: it may be masked
    target[::3] = -100
    kept = target != -100
    return target, kept, generator


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    grad_output = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype).view_as(loss)
    return torch.autograd.grad(loss, leaves, grad_output)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize(("name", "index"), family_samples.cases())
@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_of_the_logits_are_absent(impl, name, index, poison, reduction):
    options = family_samples.sample(name, index, C)
    if poison == "masked class 0" and family_samples.smooths(options):
        pytest.skip("with label smoothing a masked class is an infinite loss for every kept row, as in PyTorch")
    function = FAMILY[name].function
    target, kept, generator = _case(name)
    dtype = _dtype(impl)
    clean = torch.randn(13, C, generator=generator, dtype=torch.float64).to(dtype)
    logits = _poisoned(poison, clean, ~kept).requires_grad_()
    loss = function(logits, target, reduction=reduction, impl=impl, **options)
    (grad,) = _grads(loss, [logits])

    # the same call on the kept rows alone (a masked class stays masked there)
    sliced = _poisoned(poison, clean, ~kept)[kept].double().requires_grad_()
    expected = function(sliced, target[kept], reduction=reduction, impl="reference", **options)
    if reduction == "none":
        assert_close(loss[kept].double(), expected, dtype)
        assert (loss[~kept] == 0).all()
        grad_output = torch.linspace(-1.0, 2.0, loss.numel(), dtype=torch.float64)[kept]
        (expected_grad,) = torch.autograd.grad(expected, [sliced], grad_output)
    else:
        assert_close(loss.double(), expected, dtype)
        (expected_grad,) = _grads(expected, [sliced])
    assert_close(grad[kept].double(), expected_grad, dtype)
    assert (grad[~kept] == 0).all()


@pytest.mark.parametrize("poison", ["nan hidden state", "masked class 0 (bias)"])
@pytest.mark.parametrize("name", ["cross_entropy", "focal_loss", "ldam_loss"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ignored_tokens_of_a_linear_head_are_absent(impl, name, poison, reduction):
    options = family_samples.first_unsmoothed(name, C)  # a masked class: no label smoothing
    target, kept, generator = _case(name)
    dtype = _dtype(impl)
    hidden = torch.randn(13, 6, generator=generator, dtype=torch.float64).to(dtype)
    head = torch.randn(C, 6, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(C, generator=generator, dtype=torch.float64).to(dtype)
    if poison == "nan hidden state":
        hidden[~kept] = float("nan")
    else:
        bias[0] = -float("inf")

    def run(h, t, dtype, impl):
        leaves = [a.detach().to(dtype).requires_grad_() for a in (h, head, bias)]
        loss = xent.linear_loss(
            FAMILY[name].function, leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=reduction, impl=impl,
            chunk_size=4, **options,
        )  # fmt: skip
        return loss, _grads(loss, leaves) if reduction != "none" else None, leaves

    loss, grads, leaves = run(hidden, target, dtype, impl)
    # the same call on the kept tokens alone, in float64 by the reference
    expected, expected_grads, expected_leaves = run(hidden[kept], target[kept], torch.float64, "reference")
    if reduction == "none":
        assert_close(loss[kept].double(), expected, dtype)
        assert (loss[~kept] == 0).all()
        grad_output = torch.linspace(-1.0, 2.0, 13, dtype=torch.float64)
        grads = torch.autograd.grad(loss, leaves, grad_output.to(dtype))
        expected_grads = torch.autograd.grad(expected, expected_leaves, grad_output[kept])
    else:
        assert_close(loss.double(), expected, dtype)
    assert_close(grads[0][kept].double(), expected_grads[0], dtype)
    assert (grads[0][~kept] == 0).all()
    for got, want in zip(grads[1:], expected_grads[1:], strict=True):
        assert_close(got.double(), want, dtype)


def test_the_automatic_choice_and_the_module_with_a_masked_class():
    """The issue's case: 65,536 logits pick the chunked kernel; class 0 masked, some targets ignored."""
    logits = torch.randn(64, 1024)
    logits[:, 0] = -float("inf")
    target = torch.randint(1, 1024, (64,))
    target[::4] = -100
    expected = torch.nn.functional.cross_entropy(logits, target)
    for loss_fn in (xent.cross_entropy, xent.nn.CrossEntropyLoss()):
        leaf = logits.clone().requires_grad_()
        loss = loss_fn(leaf, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
        assert_close(loss.detach(), expected.double(), torch.float32)
