"""The Triton kernel against the reference, under the interpreter on a CPU (small shapes) or on a GPU: cross-entropy
for every option, every loss of the family (read from the registry), and the linear head on it."""

import itertools

import pytest
import torch

import xent
from tests import family_samples
from tests.conftest import assert_close
from tests.kernels.test_chunked import fused_equals_the_plain_definition

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes run on a GPU only")


def _value_and_grad(logits, target, impl, reduction="mean", inplace=False, **options):
    leaf = logits.detach().clone().requires_grad_()
    loss = xent.cross_entropy(leaf, target, impl=impl, reduction=reduction, inplace_backward=inplace, **options)
    grad_output = torch.linspace(-1.0, 2.0, loss.numel(), device=loss.device).view_as(loss) if loss.dim() else None
    loss.backward(grad_output)
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize(
    ("use_weight", "smoothing", "z_loss", "softcap"),
    list(itertools.product([False, True], [0.0, 0.2], [0.0, 1e-2], [None, 3.0])),
)
def test_every_option_matches_the_reference(reduction, probabilities, use_weight, smoothing, z_loss, softcap):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 37, generator=generator) * 3).to(DEVICE)  # 37 columns: not a multiple of the block
    if probabilities:
        target = torch.softmax(torch.randn(7, 37, generator=generator), 1).to(DEVICE)
    else:
        target = torch.randint(37, (7,), generator=generator)
        target[::3] = -100
        target = target.to(DEVICE)
    options = {
        "weight": (torch.rand(37, generator=generator) + 0.1).to(DEVICE) if use_weight else None,
        "label_smoothing": smoothing,
        "z_loss": z_loss,
        "softcap": softcap,
    }
    expected = _value_and_grad(logits, target, "reference", reduction, **options)
    actual = _value_and_grad(logits, target, "triton", reduction, **options)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_inplace(dtype):
    logits = (torch.randn(5, 300) * 4).to(dtype).to(DEVICE)
    target = torch.randint(300, (5,)).to(DEVICE)
    expected = _value_and_grad(logits.float(), target, "reference", label_smoothing=0.1)
    for inplace in (False, True):
        loss, grad = _value_and_grad(logits, target, "triton", inplace=inplace, label_smoothing=0.1)
        assert loss.dtype == dtype and grad.dtype == dtype
        torch.testing.assert_close(loss.float(), expected[0], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(grad.float(), expected[1], rtol=2e-2, atol=1e-3)


def test_target_gradient_is_formed_in_float32():
    """p_y ≈ 1 - 1e-7: p_y - 1 from a bfloat16 probability would be 0; formed in float32 it is -1e-7."""
    logits = torch.zeros(2, 64)
    logits[:, 0] = 20.0
    target = torch.zeros(2, dtype=torch.long)
    exact = _value_and_grad(logits.double(), target, "reference", reduction="sum")[1][:, 0]
    for dtype in (torch.bfloat16, torch.float32):
        _, grad = _value_and_grad(logits.to(dtype).to(DEVICE), target.to(DEVICE), "triton", reduction="sum")
        assert grad[:, 0].float().cpu().lt(0).all()
        torch.testing.assert_close(grad[:, 0].double().cpu(), exact, rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_extreme_logits_and_all_ignored(dtype):
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, 1e4], [1e4, 1e4, -1e4, -1e4]]).to(dtype)
    target = torch.tensor([1, 3, 0])
    expected = _value_and_grad(logits.double(), target, "reference", "none", z_loss=1e-4, label_smoothing=0.1)
    loss, grad = _value_and_grad(logits.to(DEVICE), target.to(DEVICE), "triton", "none", z_loss=1e-4,
                                 label_smoothing=0.1)  # fmt: skip
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double().cpu(), expected[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.double().cpu(), expected[1], rtol=1e-2, atol=1e-2)
    loss, grad = _value_and_grad(logits.to(DEVICE), torch.full((3,), -100, device=DEVICE), "triton")
    assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize(("name", "index"), family_samples.cases())
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_triton_equals_the_plain_definition(name, index, reduction):
    """The Triton kernel from the same description as the chunked one, in float32 (small shapes)."""
    fused_equals_the_plain_definition(name, index, torch.float32, reduction, True, True, "triton")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fused_linear_cross_entropy_with_the_triton_kernel(reduction):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 8, generator=generator).to(DEVICE)
    w = (torch.randn(37, 8, generator=generator) * 0.5).to(DEVICE)
    b = torch.randn(37, generator=generator).to(DEVICE)
    target = torch.randint(37, (2, 9), generator=generator).to(DEVICE)
    results = []
    for impl in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = xent.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], impl=impl,
                                         reduction=reduction, z_loss=1e-3, chunk_size=5)  # fmt: skip
        loss.backward(torch.ones_like(loss) if reduction == "none" else None)
        results.append([loss.detach()] + [leaf.grad for leaf in leaves])
    for got, want in zip(results[1], results[0], strict=True):
        assert_close(got, want, torch.float32)


@gpu_only
def test_offsets_beyond_int32():
    """16,384 rows × 131,072 columns = 2³¹ elements: row offsets overflow int32."""
    logits = torch.randn(16384, 131072, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(131072, (16384,), device="cuda")
    loss = xent.cross_entropy(logits, target, impl="triton", reduction="none")
    last = torch.nn.functional.cross_entropy(logits[-4:].float(), target[-4:], reduction="none")
    torch.testing.assert_close(loss[-4:].float(), last, rtol=1e-2, atol=1e-2)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_language_model_head_on_gpu(dtype):
    """A head of realistic proportions in half precision, several default-size chunks: its error against float32 is
    no worse than PyTorch's own in that dtype (float16 flushes the smallest gradients, ~p/N, to zero in both)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 512, device="cuda", generator=generator).to(dtype)
    w = (torch.randn(32768, 512, device="cuda", generator=generator) * 512**-0.5).to(dtype)
    target = torch.randint(32768, (4096,), device="cuda", generator=generator)
    target[::7] = -100

    def loss_and_grads(fn, cast):
        leaves = [cast(t).requires_grad_() for t in (x, w)]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach().float()] + [leaf.grad.float() for leaf in leaves]

    def torch_loss(a, b):
        return torch.nn.functional.cross_entropy(a @ b.t(), target, label_smoothing=0.1)

    exact = loss_and_grads(torch_loss, lambda t: t.float())
    torch_half = loss_and_grads(torch_loss, lambda t: t.clone())
    ours = loss_and_grads(
        lambda a, b: xent.linear_cross_entropy(a, b, target, label_smoothing=0.1, chunk_size=1000), lambda t: t.clone()
    )
    for got, baseline, want in zip(ours, torch_half, exact, strict=True):
        error, baseline_error = ((t - want).norm() / want.norm() for t in (got, baseline))
        assert error <= max(1e-2, 1.5 * baseline_error), (error, baseline_error)
