"""cross_entropy against torch.nn.functional.cross_entropy, against the formula where PyTorch has no equal, its
identities as properties (hypothesis draws the shapes, options and values), and its errors."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import xent
from tests import family_samples
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


def test_token_weights_scale_each_token_and_enter_the_mean():
    """Independent of the description: r_n ℓ_n summed over Σ r_n w_y, written out."""
    tensors = family_samples.problem(torch.float64, True, True)
    per_token = xent.cross_entropy(tensors["input"], tensors["target"], weight=tensors["weight"], reduction="none")
    kept = tensors["target"] != -100
    denominator = (tensors["token_weight"] * tensors["weight"][tensors["target"].clamp_min(0)] * kept).sum()
    expected = (tensors["token_weight"] * per_token).sum() / denominator
    for impl in ("reference", "chunked"):
        assert_close(xent.cross_entropy(**tensors, impl=impl), expected)
    with pytest.raises(ValueError, match=r"token_weight must have the target's shape \(4, 5\)"):
        xent.cross_entropy(tensors["input"], tensors["target"], token_weight=torch.ones(20))


# --- identities that hold for any input ------------------------------------------------------------------------

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


# --- errors: named arguments, shown values and shapes ----------------------------------------------------------

LOGITS = torch.randn(8, 5)
INDICES = torch.randint(5, (8,))


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
