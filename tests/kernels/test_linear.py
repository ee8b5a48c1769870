"""The fused linear head (xent.kernels.linear): linear_cross_entropy's chunked kernel against
cross_entropy(input @ W.T + b) and PyTorch, and linear_loss of every loss of the family (read from the registry)
against the loss of the materialised logits, through the chunked and the Triton kernel."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import xent
from tests import family_samples
from tests.conftest import assert_as_accurate_as_the_reference, assert_close, in_float64
from tests.test_gradient_rule import gradients
from xent.core.rowloss import RowLoss
from xent.kernels import linear, ops
from xent.losses.family import FAMILY

N, D, V = 23, 6, 13


def _problem(dtype=torch.float64, *, probabilities=False, bias=True, batch=(2, N), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, D, generator=generator, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, D, generator=generator, dtype=torch.float64) * 0.7).to(dtype)
    b = torch.randn(V, generator=generator, dtype=torch.float64).to(dtype) if bias else None
    if probabilities:
        target = torch.softmax(torch.randn(*batch, V, generator=generator, dtype=torch.float64), -1).to(dtype)
    else:
        target = torch.randint(V, batch, generator=generator)
        target.view(-1)[::4] = -100
    return x, w, b, target


def _value_and_grads(x, w, b, target, impl, reduction, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    bias = leaves[2] if b is not None else None
    loss = xent.linear_cross_entropy(
        leaves[0], leaves[1], target, linear_bias=bias, impl=impl, reduction=reduction, **options
    )
    grad_output = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype).view_as(loss)  # per-token, arbitrary
    loss.backward(grad_output if reduction == "none" else None)
    return [loss.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize(
    ("use_weight", "smoothing", "z_loss", "softcap"),
    list(itertools.product([False, True], [0.0, 0.2], [0.0, 1e-2], [None, 3.0])),
)
def test_chunked_equals_reference(dtype, reduction, probabilities, use_weight, smoothing, z_loss, softcap):
    x, w, b, target = _problem(dtype, probabilities=probabilities)
    options = {
        "weight": torch.rand(V, dtype=dtype) + 0.1 if use_weight else None,
        "label_smoothing": smoothing,
        "z_loss": z_loss,
        "softcap": softcap,
        "chunk_size": 7,  # 46 tokens: chunks of 7 do not divide them
    }
    expected = _value_and_grads(x, w, b, target, "reference", reduction, **options)
    actual = _value_and_grads(x, w, b, target, None, reduction, **options)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("chunk_size", [1, 5, 46, 1000, None])
@pytest.mark.parametrize("bias", [False, True])
def test_any_chunk_size_matches_torch(chunk_size, bias):
    x, w, b, target = _problem(bias=bias, batch=(N * 2,))
    expected = _value_and_grads(x, w, b, target, "reference", "mean")
    torch_loss = F.cross_entropy(F.linear(x, w, b), target)
    assert_close(expected[0], torch_loss)
    actual = _value_and_grads(x, w, b, target, None, "mean", chunk_size=chunk_size)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason=f"torch {torch.__version__} has none")
def test_matches_torch_linear_cross_entropy():
    x, w, b, target = _problem(torch.float32, batch=(N,))
    ours = xent.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1)
    theirs = F.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1, ignore_index=-100)
    assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_its_tolerance(dtype):
    x, w, b, target = _problem(torch.float32, batch=(64,))
    expected = _value_and_grads(x, w, b, target, "reference", "mean")
    actual = _value_and_grads(x.to(dtype), w.to(dtype), b.to(dtype), target, None, "mean", chunk_size=16)
    assert all(t.dtype == dtype for t in actual)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def _bf16_head(tokens=4096):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 8, generator=generator).to(torch.bfloat16)
    w = (torch.randn(5, 8, generator=generator) * 0.1).to(torch.bfloat16)
    target = torch.randint(5, (tokens,), generator=generator)
    exact = w.float().requires_grad_()
    F.cross_entropy(x.float() @ exact.t(), target, reduction="sum").backward()
    return x, w, target, exact.grad


def _weight_grad(x, w, target, **options):
    w = w.clone().requires_grad_()
    xent.linear_cross_entropy(x, w, target, reduction="sum", **options).backward()
    assert w.grad.dtype == w.dtype
    return w.grad.float()


def test_weight_gradient_summed_in_float32_on_request():
    """1024 chunks of bf16 products summed in bf16 lose the small ones; a float32 sum rounds once, at the end."""
    x, w, target, exact = _bf16_head()
    rounded_once = exact.to(torch.bfloat16).float()
    summed_in_float32 = _weight_grad(x, w, target, chunk_size=4, weight_grad_dtype=torch.float32)
    torch.testing.assert_close(summed_in_float32, rounded_once, rtol=2e-2, atol=1e-1)  # each G_c is bf16
    summed_in_bf16 = _weight_grad(x, w, target, chunk_size=4)
    assert (summed_in_bf16 - exact).abs().max() > 10 * (summed_in_float32 - exact).abs().max()


def test_weight_gradient_in_the_weight_dtype_rounds_once_per_chunk():
    """The default: each chunk's product is summed in float32 by its GEMM, then added to the bf16 gradient."""
    x, w, target, _ = _bf16_head()
    expected = torch.zeros(w.shape, dtype=torch.bfloat16)
    for rows in torch.arange(len(target)).split(1024):  # the same sum, written out: one rounding per chunk
        logits = x[rows].float() @ w.float().t()
        grad = torch.softmax(logits, 1) - F.one_hot(target[rows], 5)
        expected = (expected.float() + grad.t() @ x[rows].float()).to(torch.bfloat16)
    got = _weight_grad(x, w, target, chunk_size=1024)
    torch.testing.assert_close(got, expected.float(), rtol=1e-2, atol=1e-2)


def test_deterministic():
    x, w, b, target = _problem(torch.float32, batch=(200,))
    first = _value_and_grads(x, w, b, target, None, "mean", chunk_size=16)
    second = _value_and_grads(x, w, b, target, None, "mean", chunk_size=16)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


def test_all_ignored_and_no_grad():
    x, w, b, target = _problem(batch=(N,))
    loss, grad_x, grad_w, grad_b = _value_and_grads(x, w, b, torch.full((N,), -100), None, "mean")
    assert loss.item() == 0.0 and not grad_x.any() and not grad_w.any() and not grad_b.any()
    with torch.no_grad():
        assert_close(xent.linear_cross_entropy(x, w, target, linear_bias=b), F.cross_entropy(F.linear(x, w, b), target))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(reduction):
    x, w, b, target = _problem(batch=(9,))
    options = RowLoss(weight=torch.rand(V, dtype=torch.float64) + 0.5, label_smoothing=0.1, z_loss=0.05, softcap=2.5)

    def loss(x, w, b):
        return ops.fused_linear_row_loss(x, w, b, target, options, reduction, "chunked", chunk_size=4, retain=True)

    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(loss, inputs)


def test_default_chunk_size_bounds_the_logits_chunk():
    assert linear.default_chunk_size(4096, 32768, torch.device("cpu")) * 32768 * 4 <= linear.CPU_CHUNK_BYTES
    assert linear.default_chunk_size(10, 32768, torch.device("cpu")) == 10
    assert linear.default_chunk_size(10**6, 10**9, torch.device("cpu")) == 1


def test_default_chunk_size_on_gpus(monkeypatch):
    free = 80 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, free))
    cuda = torch.device("cuda")
    assert linear.default_chunk_size(8192, 128256, cuda, 2) == linear.ACCELERATOR_CHUNK_TOKENS
    assert linear.default_chunk_size(8192, 8192, cuda, 2) == 4096  # small V: 64 MB chunks
    assert linear.default_chunk_size(100, 128256, cuda, 2) == 100
    free = 8 * 128256 * 2 * 300  # an eighth of the free memory holds 300 rows
    assert linear.default_chunk_size(8192, 128256, cuda, 2) == 300


# --- linear_loss: every loss of the family ---------------------------------------------------------------------

C = family_samples.C


def _materialised(loss_fn, reduction, options):
    """The definition linear_loss must equal: the loss on F.linear's logits, flattened to (N, V)."""

    def loss(input, linear_weight, linear_bias, target, weight, token_weight):
        logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
        value = loss_fn(logits.reshape(-1, C), target.reshape(-1), weight=weight, token_weight=token_weight.reshape(-1),
                        reduction=reduction, impl="reference", **options)  # fmt: skip
        return value.view(target.shape) if reduction == "none" else value

    return loss


@pytest.mark.parametrize(("name", "index"), family_samples.cases())
@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_linear_loss_equals_the_loss_of_the_materialised_logits(name, index, impl, reduction):
    if impl == "triton":
        pytest.importorskip("triton")
    loss_fn, options = FAMILY[name].function, family_samples.sample(name, index, C)
    dtype = torch.float64 if impl == "chunked" else torch.float32
    tensors = family_samples.head_problem(dtype, name)
    # the class weight too: the fused kernels get its gradient from the description's reference, in backward
    requires = ("input", "linear_weight", "linear_bias", "weight")
    expected = gradients(_materialised(loss_fn, reduction, options), tensors, requires)
    fused = gradients(
        lambda **t: xent.linear_loss(loss_fn, **t, reduction=reduction, impl=impl, chunk_size=4, **options),
        tensors,
        requires,
    )
    by_name = gradients(
        lambda **t: xent.linear_loss(name, **t, reduction=reduction, impl=impl, chunk_size=3, **options),
        tensors,
        requires,
    )
    exact = gradients(_materialised(loss_fn, reduction, options), in_float64(tensors), requires)
    for actual in (fused, by_name):
        if dtype == torch.float64:
            assert_close(actual[0], expected[0], dtype)
            for key in requires:
                assert_close(actual[1][key], expected[1][key], dtype)
        else:
            assert_as_accurate_as_the_reference(actual, expected, exact, requires)


@pytest.mark.parametrize(("name", "index"), family_samples.cases([n for n in FAMILY if not FAMILY[n].caps_itself]))
@pytest.mark.parametrize("impl", ["chunked", "triton", "reference"])
def test_linear_loss_softcap_caps_the_logits_of_every_loss(name, index, impl):
    """softcap is cross_entropy's own option; any other loss is taken of the capped logits c·tanh(z / c)."""
    if impl == "triton":
        pytest.importorskip("triton")
    loss_fn, options = FAMILY[name].function, family_samples.sample(name, index, C)
    dtype = torch.float32 if impl == "triton" else torch.float64
    tensors = family_samples.head_problem(dtype, name)
    requires = ("input", "linear_weight", "linear_bias")

    def capped(input, linear_weight, linear_bias, target, weight, token_weight):
        logits = 0.5 * torch.tanh(torch.nn.functional.linear(input, linear_weight, linear_bias) / 0.5)
        return loss_fn(logits.reshape(-1, C), target.reshape(-1), weight=weight, impl="reference", **options)

    expected = gradients(capped, {**tensors, "token_weight": None}, requires)
    actual = gradients(
        lambda **t: xent.linear_loss(loss_fn, **t, softcap=0.5, impl=impl, chunk_size=4, **options),
        {**tensors, "token_weight": None},
        requires,
    )
    assert_close(actual[0], expected[0], dtype)
    for key in requires:
        assert_close(actual[1][key], expected[1][key], dtype)
