"""The autocast policy (xent.core.autocast): under torch.autocast the losses compute and return float32, as PyTorch's
autocast policy for its losses, while a linear head's GEMMs run in the autocast dtype.

The gradient rule (tests/test_gradient_rule.py) checks every loss's values and gradients under autocast."""

import torch

import xent
from tests import family_samples


def test_fused_family_under_autocast_returns_float32_from_half_precision_heads():
    head = family_samples.head_problem(torch.float32)
    C = family_samples.C
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for loss in (
            xent.linear_loss(xent.focal_loss, head["input"], head["linear_weight"], head["target"], gamma=2.0),
            xent.linear_distillation_loss(head["input"], head["linear_weight"], head["input"], head["linear_weight"]),
            xent.focal_loss(torch.randn(8, C), torch.randint(C, (8,)), impl="chunked"),
        ):
            assert loss.dtype == torch.float32
