"""The Triton kernel that scales a gradient in place unless the factor is one (xent.kernels.triton.scale)."""

import pytest
import torch

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("factor", [1.0, 0.5, -3.0])
def test_scale_unless_one(factor):
    from xent.kernels.triton.scale import scale_unless_one_

    tensor = torch.randn(200_000, device=DEVICE).to(torch.bfloat16)  # more blocks than programs; a partial one
    expected = (tensor.float() * factor).to(torch.bfloat16)
    scale_unless_one_(tensor, torch.tensor(factor, device=DEVICE))
    # one bfloat16 ulp: the interpreter rounds float32 to bfloat16 toward zero, a GPU to nearest
    torch.testing.assert_close(tensor.float(), expected.float(), rtol=2**-7, atol=0)
    with pytest.raises(ValueError, match=r"contiguous tensor and a one-element factor"):
        scale_unless_one_(tensor.view(400, 500).t(), torch.tensor(factor))
