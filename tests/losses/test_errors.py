"""Bad input raises ValueError/TypeError whose message names the argument and shows the bad value or shape."""

import pytest
import torch

import xent

LOGITS = torch.randn(8, 5)
INDICES = torch.randint(5, (8,))
BINARY = torch.randn(8, 5)
BINARY_TARGET = torch.rand(8, 5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reduction": "avg"}, ValueError, r"reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
        ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must be in \[0, 1\], got -0.1"),
        ({"label_smoothing": "0.1"}, TypeError, r"label_smoothing must be a number"),
        ({"z_loss": -1e-4}, ValueError, r"z_loss must be in \[0, inf\], got -0.0001"),
        ({"softcap": 0.0}, ValueError, r"softcap must be in \(0, inf\], got 0"),
        ({"softcap": -3}, ValueError, r"softcap must be in \(0, inf\], got -3"),
        (
            {"weight": torch.ones(4)},
            ValueError,
            r"weight must have shape \(5,\), one entry per class, got shape \(4,\)",
        ),
        ({"weight": torch.ones(1, 5)}, ValueError, r"weight must have shape \(5,\).*got shape \(1, 5\)"),
        ({"weight": torch.ones(5, dtype=torch.long)}, TypeError, r"weight must be a floating-point tensor"),
        ({"ignore_index": 1.0}, TypeError, r"ignore_index must be an int"),
        ({"impl": "fastest"}, ValueError, r"impl must be one of .*got 'fastest'"),
    ],
)
def test_cross_entropy_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        xent.cross_entropy(LOGITS, INDICES, **kwargs)


@pytest.mark.parametrize(
    ("input", "target", "error", "match"),
    [
        (
            LOGITS,
            torch.randint(5, (8, 3)),
            ValueError,
            r"target has shape \(8, 3\) but input has shape \(8, 5\); expected \(8,\) class indices or \(8, 5\) "
            r"probabilities",
        ),
        (LOGITS, torch.rand(8, 3), ValueError, r"target has shape \(8, 3\) but input has shape \(8, 5\)"),
        (LOGITS, INDICES.float(), TypeError, r"class indices and must have an integer dtype, got torch.float32"),
        (LOGITS, INDICES.bool(), TypeError, r"must have an integer dtype, got torch.bool"),
        (LOGITS, torch.tensor([0, 1, 2, 3, 4, 5, 0, 0]), ValueError, r"class index 5, outside \[0, 5\)"),
        (LOGITS, torch.tensor([0, 1, -1, 3, 4, 0, 0, 0]), ValueError, r"class index -1, outside \[0, 5\)"),
        (torch.tensor(1.0), torch.tensor(0), ValueError, r"input must have a class dimension.*got shape \(\)"),
        (torch.ones(8, 5, dtype=torch.long), INDICES, TypeError, r"input must be a floating-point tensor, got "),
        ([[1.0, 2.0]], INDICES, TypeError, r"input must be a torch.Tensor, got list"),
        (torch.randn(8, 0), torch.zeros(8, dtype=torch.long), ValueError, r"at least one class"),
    ],
)
def test_cross_entropy_bad_tensors(input, target, error, match):
    with pytest.raises(error, match=match):
        xent.cross_entropy(input, target)


def test_index_range_check_is_switchable():
    bad = torch.tensor([0, 1, 2, 3, 4, 7, 0, 0])
    with xent.value_checks(False):
        xent.cross_entropy(LOGITS, torch.where(bad > 4, 0, bad))  # fine
    with pytest.raises(ValueError, match="class index 7"):
        xent.cross_entropy(LOGITS, bad)
    xent.set_value_checks(False)
    try:
        # With the checks off nothing looks at the values: no host sync, and no error either.
        with pytest.raises((IndexError, RuntimeError)):
            xent.cross_entropy(LOGITS, bad)
    finally:
        xent.set_value_checks(None)
    with pytest.raises(TypeError, match="enabled must be True, False or None"):
        xent.set_value_checks("on")


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


@pytest.mark.parametrize(
    ("module", "kwargs", "match"),
    [
        (xent.nn.CrossEntropyLoss, {"reduction": "avg"}, "reduction must be one of"),
        (xent.nn.CrossEntropyLoss, {"z_loss": -1.0}, "z_loss must be in"),
        (xent.nn.BCEWithLogitsLoss, {"label_smoothing": 3.0}, "label_smoothing must be in"),
        (xent.nn.BCELoss, {"reduction": None}, "reduction must be one of"),
        # every described loss: its own options, with the function's message, before the first call
        (xent.nn.FocalLoss, {"gamma": -1.0}, r"gamma must be in \[0, inf\], got -1"),
        (xent.nn.FocalLoss, {"reduction": "avg"}, "reduction must be one of"),
        (xent.nn.Poly1CrossEntropyLoss, {"epsilon": -2.0}, "epsilon must be in"),
        (xent.nn.GeneralizedCrossEntropyLoss, {"q": 2.0}, "q must be in"),
        (xent.nn.SymmetricCrossEntropyLoss, {"log_zero": 1.0}, "log_zero must be in"),
        (xent.nn.LogitAdjustedCrossEntropyLoss, {"class_counts": [3, 0, 1]}, "class_counts must be positive"),
        (xent.nn.BalancedSoftmaxCrossEntropyLoss, {"class_counts": [3, 1], "label_smoothing": 2.0}, "label_smoothing"),
        (xent.nn.LDAMLoss, {"class_counts": [3, 1], "scale": 0.0}, "scale must be in"),
        (xent.nn.LinearCrossEntropyLoss, {"label_smoothing": 2.0}, "label_smoothing must be in"),
        (xent.nn.LinearCrossEntropyLoss, {"reduction": "avg"}, "reduction must be one of"),
        (xent.nn.WeightedSum, {"terms": {"a": (1.0, 3)}}, r"terms\['a'\] must be a pair \(weight, loss\)"),
    ],
)
def test_modules_reject_bad_options_at_construction(module, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        module(**kwargs)


# --- values that used to give silent wrong answers -------------------------------------------------------------


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


def test_a_teacher_distribution_without_mass_is_rejected():
    teacher = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"distribution at \(1,\) sums to 0"):
        xent.distillation_loss(torch.randn(2, 3), teacher, teacher_is_probs=True)  # was NaN
