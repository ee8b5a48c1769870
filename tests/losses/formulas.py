"""What the tests of the losses against each paper's formula share: a problem, PyTorch's reduction and the check of
a value and its gradients against a plain float64 reference."""

import torch

from tests.conftest import assert_close

N, C = 11, 6
REDUCTIONS = ("none", "mean", "sum")


def problem(dtype=torch.float64, ignore=True, spatial=False):
    shape = (N, C, 3) if spatial else (N, C)
    logits = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    target = torch.randint(C, (N, 3) if spatial else (N,))
    if ignore:
        target.view(-1)[::4] = -100
    return logits, target


def reduced(per_element, target, weight, reduction):
    """Reference reduction: weighted mean over kept targets, as PyTorch's cross-entropy."""
    kept = (target != -100).double()
    w = weight[target.clamp_min(0)] if weight is not None else torch.ones_like(kept)
    per_element = per_element * w * kept
    if reduction == "none":
        return per_element
    if reduction == "sum":
        return per_element.sum()
    return per_element.sum() / (w * kept).sum()


def p_y(logits, target):
    """p_y of each element with the class dimension at 1: (N, C[, d]) → (N[, d])."""
    probs = torch.softmax(logits, dim=1)
    return probs.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)


def check(ours, expected, inputs, dtype=torch.float64):
    assert_close(ours, expected, dtype)
    grad_output = torch.randn_like(ours)
    for grad_ours, grad_expected in zip(
        torch.autograd.grad(ours, inputs, grad_output, retain_graph=True),
        torch.autograd.grad(expected, inputs, grad_output),
        strict=True,
    ):
        assert_close(grad_ours, grad_expected, dtype)
