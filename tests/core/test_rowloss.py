"""The row-loss description (xent.core.rowloss): its defaults, and its target terms' numerics where p_y rounds to 1."""

import torch

import xent
from xent.core import rowloss
from xent.core.rowloss import RowLoss


def test_options_dataclass_defaults_describe_cross_entropy():
    options = RowLoss()
    assert options.term == rowloss.TargetTerm() and options.term.name == "cross_entropy"
    assert options.class_offset is None and options.target_margin is None and options.logit_scale == 1.0


def test_extreme_and_confident_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [30.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([0, 1, 0])  # the first and last rows are certain: p_y = 1, u = 0
    for loss_fn, options in [(xent.focal_loss, {"gamma": 0.5}), (xent.generalized_cross_entropy, {"q": 0.3})]:
        for impl in ("reference", "chunked"):
            loss = loss_fn(logits, target, impl=impl, reduction="sum", **options)
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss_fn.__name__, impl)
