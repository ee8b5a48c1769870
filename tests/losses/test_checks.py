"""The checks of the values a loss is given (xent.losses.checks), shared by the losses: probabilities in [0, 1],
non-negative weights, class indices of any integer dtype — values that used to give silent wrong answers."""

import pytest
import torch

import xent


def test_probability_targets_outside_zero_one_are_rejected_but_rows_need_not_sum_to_one():
    logits = torch.randn(8, 5)
    with pytest.raises(ValueError, match="target must hold probabilities in"):
        xent.cross_entropy(logits, -torch.rand(8, 5))  # was a negative loss
    with pytest.raises(ValueError, match="target must hold probabilities in"):
        xent.linear_cross_entropy(torch.randn(8, 3), torch.randn(5, 3), torch.rand(8, 5) + 1)
    rows = torch.rand(8, 5)  # rows summing to anything in [0, 5], as PyTorch accepts
    torch.testing.assert_close(xent.cross_entropy(logits, rows), torch.nn.functional.cross_entropy(logits, rows))
    with xent.value_checks(False):
        xent.cross_entropy(logits, -torch.rand(8, 5))  # the switch turns the check off


def test_negative_class_and_token_weights_are_rejected():
    logits, target = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"weight must be non-negative, got -1 at index 1"):
        xent.cross_entropy(logits, target, weight=torch.tensor([1.0, -1.0, 0.0]))  # was 0.0, "nothing to average"
    with pytest.raises(ValueError, match="weight must be non-negative"):
        xent.focal_loss(logits, target, weight=torch.tensor([1.0, -1.0, 0.0]), impl="chunked")
    with pytest.raises(ValueError, match=r"token_weight must be non-negative, got -0.5 at index 1"):
        xent.cross_entropy(logits, target, token_weight=torch.tensor([1.0, -0.5]))
    # zero weights are fine, and every weight zero is "nothing to average": 0
    assert xent.cross_entropy(logits, target, weight=torch.zeros(3)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_any_integer_dtype_holds_class_indices(dtype):
    logits, target = torch.randn(4, 5), torch.tensor([0, 4, 2, 1])
    expected = torch.nn.functional.cross_entropy(logits, target)
    for impl in ("reference", "chunked"):
        torch.testing.assert_close(xent.cross_entropy(logits, target.to(dtype), impl=impl), expected)
    torch.testing.assert_close(xent.focal_loss(logits, target.to(dtype), gamma=0.0), expected)
    hidden, head = torch.randn(4, 3), torch.randn(5, 3)
    torch.testing.assert_close(
        xent.linear_cross_entropy(hidden, head, target.to(dtype)), xent.linear_cross_entropy(hidden, head, target)
    )
