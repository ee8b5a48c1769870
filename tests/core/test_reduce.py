"""The reduction (xent.core.reduce): ``"mean"`` with nothing to average — every target ignored, or an empty batch —
is 0 with a zero gradient, a deliberate, documented difference from PyTorch's NaN."""

import pytest
import torch
import torch.nn.functional as F

import xent


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
