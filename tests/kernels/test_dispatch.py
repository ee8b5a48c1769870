"""The choice of implementation (xent.kernels.dispatch): the fused kernels for large problems, the reference where a
fused kernel does not differentiate what the call needs — or a refusal naming it when a kernel is asked for."""

import pytest
import torch

import xent
from tests import family_samples
from xent.core.rowloss import RowLoss
from xent.kernels import dispatch


def automatic(logits, *, inplace_backward=False, weight=None, target=None):
    """The automatic choice for cross-entropy on ``logits`` (class indices 0 unless ``target`` is given)."""
    target = logits.new_zeros(logits.shape[0], dtype=torch.long) if target is None else target
    return dispatch.choose("logits", None, logits, target, RowLoss(weight=weight), inplace_backward=inplace_backward)


def test_dispatch_picks_chunked_for_large_problems_only():
    small = torch.randn(4, 10, requires_grad=True)
    large = torch.randn(512, 1024, requires_grad=True)
    assert automatic(small) == "pytorch"  # a plain cross-entropy: PyTorch's own (tests/kernels/test_pytorch_path.py)
    assert automatic(small, target=torch.full((4,), -100)) == "reference"  # all ignored: xent's 0, PyTorch's NaN
    assert automatic(large) == "chunked"
    assert automatic(large.detach()) == "chunked"  # evaluation
    assert automatic(small, inplace_backward=True) == "chunked"
    with pytest.raises(ValueError, match="inplace_backward=True needs a fused kernel"):
        xent.cross_entropy(small, torch.zeros(4, dtype=torch.long), impl="reference", inplace_backward=True)


def test_dispatch():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        assert automatic(torch.randn(256, 1024, device="cuda", requires_grad=True)) == "triton"
    else:  # the interpreter is for tests: CPU tensors keep the chunked kernel unless triton is asked for
        assert automatic(torch.randn(512, 1024, requires_grad=True)) == "chunked"


def test_what_the_fused_kernels_do_not_differentiate_is_refused_or_left_to_the_reference():
    tensors = family_samples.problem(torch.float64, False, True)
    tensors["input"].requires_grad_()
    alpha = torch.rand(tensors["input"].shape[1], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"impl='chunked' does not differentiate alpha.*impl='reference'"):
        xent.focal_loss(**tensors, alpha=alpha, impl="chunked")
    token_weight = tensors.pop("token_weight").requires_grad_()
    with pytest.raises(ValueError, match="token_weight"):
        xent.cross_entropy(**tensors, token_weight=token_weight, impl="chunked")
    # the automatic choice runs the reference, which differentiates them
    big = torch.randn(300, 300, dtype=torch.float64, requires_grad=True)
    target = torch.randint(300, (300,))
    alpha = torch.rand(300, dtype=torch.float64, requires_grad=True)
    xent.focal_loss(big, target, alpha=alpha).backward()
    assert alpha.grad is not None
