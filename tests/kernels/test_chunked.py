"""The chunked kernel against the reference: cross-entropy for every option, every loss of the family (read from the
registry) against its own plain definition, and the kernel's memory contract."""

import itertools

import pytest
import torch

import xent
from tests import family_samples
from tests.conftest import assert_as_accurate_as_the_reference, assert_close, in_float64
from tests.test_gradient_rule import gradients
from xent.core.rowloss import RowLoss
from xent.kernels import chunked, ops
from xent.losses.family import FAMILY

OPTIONS = list(
    itertools.product(
        [False, True],  # class weights
        [0.0, 0.2],  # label smoothing
        [0.0, 1e-2],  # z-loss
        [None, 3.0],  # softcap
    )
)


def _run(logits, target, impl, reduction, grad_output_seed=1, **options):
    logits = logits.detach().clone().requires_grad_()
    loss = xent.cross_entropy(logits, target, impl=impl, reduction=reduction, **options)
    generator = torch.Generator().manual_seed(grad_output_seed)
    grad_output = torch.randn(loss.shape, generator=generator, dtype=loss.dtype) if reduction == "none" else None
    loss.backward(grad_output)
    return loss.detach(), logits.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize(("use_weight", "smoothing", "z_loss", "softcap"), OPTIONS)
def test_chunked_equals_reference(dtype, reduction, probabilities, use_weight, smoothing, z_loss, softcap):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 37, 11, generator=generator, dtype=torch.float64).to(dtype) * 4  # (N, C, d)
    logits = logits.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous canonical view
    if probabilities:
        target = torch.softmax(torch.randn(3, 37, 11, generator=generator, dtype=dtype), 1)
    else:
        target = torch.randint(37, (3, 11), generator=generator)
        target[:, ::3] = -100
    weight = torch.rand(37, generator=generator, dtype=dtype) + 0.1 if use_weight else None
    options = {"weight": weight, "label_smoothing": smoothing, "z_loss": z_loss, "softcap": softcap}
    expected = _run(logits, target, "reference", reduction, **options)
    actual = _run(logits, target, "chunked", reduction, **options)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("block_rows", [1, 5, 64])
def test_block_sizes_that_do_not_divide_the_rows(block_rows, monkeypatch):
    monkeypatch.setattr(chunked, "rows_per_block", lambda num_classes, device=None: block_rows)
    logits = torch.randn(33, 17, dtype=torch.float64)
    target = torch.randint(17, (33,))
    target[4] = -100
    for reduction in ("none", "mean"):
        expected = _run(logits, target, "reference", reduction, label_smoothing=0.1, z_loss=1e-3)
        actual = _run(logits, target, "chunked", reduction, label_smoothing=0.1, z_loss=1e-3)
        for got, want in zip(actual, expected, strict=True):
            assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_the_float32_computation(dtype):
    logits = (torch.randn(64, 1000) * 5).to(dtype)
    target = torch.randint(1000, (64,))
    loss, grad = _run(logits, target, "chunked", "mean", label_smoothing=0.1)
    assert loss.dtype == dtype and grad.dtype == dtype
    expected_loss, expected_grad = _run(logits.float(), target, "reference", "mean", label_smoothing=0.1)
    torch.testing.assert_close(loss, expected_loss.to(dtype))
    torch.testing.assert_close(grad, expected_grad.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_extreme_logits(dtype):
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, 1e4], [1e4, 1e4, -1e4, -1e4]]).to(dtype)
    target = torch.tensor([1, 3, 0])
    loss, grad = _run(logits, target, "chunked", "none", z_loss=1e-4, label_smoothing=0.1)
    expected_loss, expected_grad = _run(logits.double(), target, "reference", "none", z_loss=1e-4, label_smoothing=0.1)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("margin", [0.0, 30.0, 43.0, 45.0, 60.0, 120.0, 5000.0])
@pytest.mark.parametrize("every", [3, 12])
def test_target_probabilities_on_both_sides_of_the_tiny_threshold(dtype, inplace, margin, every):
    # The CPU kernel reads the log-sum-exp from the target's probability unless that is below 2^-64 (a loss above
    # ~44), where it takes the row maximum: rows on both sides, mixed in one block, with the logits kept (a new
    # gradient buffer) and overwritten (inplace_backward) before the fallback runs — over the whole block when a
    # quarter of its rows or more are tiny (every third row), for those rows alone otherwise (one row in twelve).
    generator = torch.Generator().manual_seed(int(margin))
    logits = torch.randn(12, 50, generator=generator, dtype=torch.float64)
    target = torch.randint(50, (12,), generator=generator)
    tiny = torch.arange(12) % every == 0
    logits[tiny, (target[tiny] + 1) % 50] += margin  # another class far above the target
    target[5] = -100
    options = {"label_smoothing": 0.1, "z_loss": 1e-4}
    expected_loss, expected_grad = _run(logits, target, "reference", "none", **options)
    leaf = logits.to(dtype).requires_grad_()
    # a fresh copy as the kernel's input: inplace_backward overwrites it
    loss = xent.cross_entropy(leaf * 1, target, impl="chunked", reduction="none", inplace_backward=inplace, **options)
    loss.backward(torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype))
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 1e-5}
    torch.testing.assert_close(loss.double(), expected_loss, **tolerance)
    torch.testing.assert_close(leaf.grad.double(), expected_grad, **tolerance)


def test_all_ignored_is_zero_with_zero_gradient():
    logits = torch.randn(8, 5)
    loss, grad = _run(logits, torch.full((8,), -100), "chunked", "mean", label_smoothing=0.3, z_loss=1e-2)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_inplace_backward_writes_the_gradient_into_the_logits():
    logits = torch.randn(16, 40, dtype=torch.float64)
    target = torch.randint(40, (16,))
    expected_loss, expected_grad = _run(logits, target, "reference", "mean", label_smoothing=0.1)
    leaf = logits.clone().requires_grad_()
    storage = leaf.data_ptr()
    loss = xent.cross_entropy(leaf, target, label_smoothing=0.1, inplace_backward=True)
    loss.backward()
    assert_close(loss, expected_loss)
    assert_close(leaf.grad, expected_grad)
    assert leaf.grad.data_ptr() == storage  # no new logits-sized buffer
    assert_close(leaf.detach(), expected_grad)  # the logits were overwritten, as documented


def test_second_backward_is_refused_with_a_clear_message():
    logits = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    loss = xent.cross_entropy(logits, torch.randint(6, (8,)), impl="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 2, 1])
    options = RowLoss(weight=torch.rand(5, dtype=torch.float64) + 0.5, label_smoothing=0.2, z_loss=0.05, softcap=2.0)

    def loss(x):
        return ops.fused_row_loss(x, target, options, reduction, "chunked", retain=True)

    assert torch.autograd.gradcheck(loss, (logits,))
    probs = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(
        lambda x: ops.fused_row_loss(x, probs, options, reduction, "chunked", retain=True), (logits,)
    )


def test_extra_memory_is_one_block_not_the_logits():
    """Beyond the logits and their gradient, the kernel allocates O(M) row statistics and one block."""
    logits = torch.randn(512, 4096, requires_grad=True)
    target = torch.randint(4096, (512,))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        xent.cross_entropy(logits, target, impl="chunked", label_smoothing=0.1).backward()
    logits_bytes = logits.numel() * 4
    allocations = [event for event in prof.events() if not event.cpu_children]  # leaf ops: each allocation once
    big = [event for event in allocations if event.cpu_memory_usage >= logits_bytes // 8]
    assert len(big) == 1 and big[0].cpu_memory_usage == logits_bytes  # the gradient, and nothing else that size


# --- every loss of the family ----------------------------------------------------------------------------------


def fused_equals_the_plain_definition(name, index, dtype, reduction, weighted, token_weighted, impl):
    """A loss of the family through the fused kernel ``impl``: the value and gradients of its own plain definition
    (``impl="reference"``), exactly in float64, as accurately as the reference in float32."""
    loss_fn, options = FAMILY[name].function, family_samples.sample(name, index, family_samples.C)
    tensors = family_samples.problem(dtype, weighted, token_weighted)
    if name == "ldam_loss":  # LDAM's logits are cosine similarities, scaled by s
        tensors["input"] = torch.tanh(tensors["input"])
    requires = ("input", "weight") if weighted else ("input",)

    def run(impl, tensors=tensors):
        return gradients(lambda **t: loss_fn(**t, reduction=reduction, impl=impl, **options), tensors, requires)

    expected = run("reference")
    actual = run(impl)
    if dtype == torch.float64:
        assert_close(actual[0], expected[0], dtype)
        for key in requires:
            assert_close(actual[1][key], expected[1][key], dtype)
        return
    exact = run("reference", in_float64(tensors))
    assert_as_accurate_as_the_reference(actual, expected, exact, requires)


@pytest.mark.parametrize(("name", "index"), family_samples.cases())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("weighted", "token_weighted"), [(False, False), (True, False), (True, True)])
def test_chunked_equals_the_plain_definition(name, index, dtype, reduction, weighted, token_weighted):
    fused_equals_the_plain_definition(name, index, dtype, reduction, weighted, token_weighted, "chunked")


@pytest.mark.parametrize(
    ("name", "index"),
    [("focal_loss", 2), ("ldam_loss", 0), ("logit_adjusted_cross_entropy", 1)],
    ids=["focal-alpha-per-class", "ldam", "logit-adjusted-smoothing"],
)
@pytest.mark.parametrize("block_rows", [1, 3])
def test_family_blocks_that_do_not_divide_the_rows(name, index, block_rows, monkeypatch):
    monkeypatch.setattr(chunked, "rows_per_block", lambda num_classes, device=None: block_rows)
    fused_equals_the_plain_definition(name, index, torch.float64, "none", True, True, "chunked")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_the_float32_definition(dtype):
    tensors = family_samples.problem(torch.float32, True, False)
    tensors["input"] = tensors["input"].to(dtype)
    loss = xent.focal_loss(**tensors, gamma=2.0, impl="chunked")
    expected = xent.focal_loss(**{**tensors, "input": tensors["input"].float()}, gamma=2.0, impl="reference")
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.float(), expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize(("name", "index"), family_samples.cases())
def test_tiny_target_probabilities_for_every_loss_of_the_family(name, index):
    # The fallback of the log-sum-exp (target probability below 2^-64) under every target term and transform: one row
    # of the block (the per-row way), then every third row (the whole-block way) far below another class.
    options, function = family_samples.sample(name, index, 11), FAMILY[name].function
    for every in (12, 3):
        generator = torch.Generator().manual_seed(every)
        logits = torch.randn(12, 11, generator=generator, dtype=torch.float64)
        target = torch.randint(11, (12,), generator=generator)
        tiny = torch.arange(12) % every == 0
        logits[tiny, (target[tiny] + 1) % 11] += 80.0
        if name == "ldam_loss":  # cosines, scaled by s
            logits = torch.tanh(logits / 80.0)
        target[5] = -100
        leaf, expected_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss = function(leaf, target, impl="chunked", reduction="sum", **options)
        expected = function(expected_leaf, target, impl="reference", reduction="sum", **options)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=1e-9, atol=1e-12)
