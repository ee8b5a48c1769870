"""The row algebra (xent.core.rows) against autograd of the plain definition: the transform against its formula, the
losses and the gradient's coefficients of every sample of every loss of the registry against the reference and its
gradient."""

import dataclasses

import pytest
import torch

from tests import family_samples
from xent.core import rows
from xent.core.reference import reference_rows
from xent.core.rowloss import RowLoss
from xent.losses.family import FAMILY

C = 7


def _problem(name, index, weighted):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(9, C, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(C, (9,), generator=generator)
    target[::4] = -100
    sample = family_samples.sample(name, index, C)
    own = {key: value for key, value in sample.items() if key != "softcap"}
    options = FAMILY[name].description(C, own, softcap=sample.get("softcap"), ignore_index=-100)
    if weighted:
        options = dataclasses.replace(options, weight=torch.rand(C, generator=generator, dtype=torch.float64) + 0.2)
    return logits, target, options


def _target_rows(target, options):
    valid = target != options.ignore_index
    safe = torch.where(valid, target, 0)
    target_weight = valid.double() if options.weight is None else options.weight[safe] * valid
    main_weight = target_weight if options.alpha is None else target_weight * options.alpha[safe]
    total = float(C) if options.weight is None else options.weight.sum()
    return rows.TargetRows(valid.double(), target_weight, main_weight, total), safe


def _margin(options, safe):
    return None if options.target_margin is None else options.target_margin[safe].unsqueeze(1)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("name", "index"), family_samples.cases())
def test_losses_and_gradient_coefficients_equal_autograd_of_the_reference(name, index, weighted):
    logits, target, options = _problem(name, index, weighted)
    target_rows, safe = _target_rows(target, options)
    z, _ = rows.transform(logits, options, target_column=safe.unsqueeze(1), margin=_margin(options, safe))
    lse = torch.logsumexp(z, dim=1)
    u = z.gather(1, safe.unsqueeze(1)).squeeze(1) - lse
    smooth = z.sum(1) if options.weight is None else z @ options.weight
    losses = rows.row_losses(u, lse, smooth, target_rows, options, C)
    kept = target != -100
    expected = reference_rows(logits, target, options)
    torch.testing.assert_close(torch.where(kept, losses, 0.0), expected, rtol=1e-12, atol=1e-12)

    # the gradient with respect to z: the reference on z itself, with the transform left out of the description
    on_z = dataclasses.replace(options, softcap=None, class_offset=None, target_margin=None, logit_scale=1.0)
    leaf = z.detach().requires_grad_()
    grad_rows = torch.linspace(-1.0, 2.0, 9, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad(reference_rows(leaf, target, on_z), leaf, grad_rows)
    coefficient, slope = rows.gradient_coefficients(u, lse, target_rows, options, C)
    uniform = (
        options.label_smoothing / C * (torch.ones(C, dtype=torch.float64) if options.weight is None else options.weight)
    )
    grad = coefficient.unsqueeze(1) * torch.softmax(z, 1) - target_rows.valid.unsqueeze(1) * uniform
    grad = grad.scatter_add(1, safe.unsqueeze(1), slope.unsqueeze(1)) * grad_rows.unsqueeze(1)
    torch.testing.assert_close(torch.where(kept.unsqueeze(1), grad, 0.0), expected_grad, rtol=1e-10, atol=1e-12)


def test_transform_is_the_formula_on_whole_rows_a_shard_and_a_gathered_column():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, C, generator=generator, dtype=torch.float64) * 4
    target = torch.randint(C, (5,), generator=generator)
    offset = torch.randn(C, generator=generator, dtype=torch.float64)
    margins = torch.rand(C, generator=generator, dtype=torch.float64)
    options = RowLoss(softcap=2.5, class_offset=offset, target_margin=margins, logit_scale=1.7)
    expected = 1.7 * (
        2.5 * torch.tanh(x / 2.5) + offset - margins[target].unsqueeze(1) * torch.nn.functional.one_hot(target, C)
    )
    before = x.clone()
    z, tanh = rows.transform(x, options, target_column=target.unsqueeze(1), margin=margins[target].unsqueeze(1))
    torch.testing.assert_close(z, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(tanh, torch.tanh(x / 2.5))
    assert torch.equal(x, before)  # not in place unless asked
    # a shard of columns 2..5 with the target's column inside it, its margin 0 elsewhere
    shard = slice(2, 5)
    inside = (target >= 2) & (target < 5)
    local = torch.where(inside, target - 2, 0).unsqueeze(1)
    z_shard, _ = rows.transform(
        x[:, shard].clone(), options, classes=shard, target_column=local,
        margin=(margins[target] * inside).unsqueeze(1), in_place=True,
    )  # fmt: skip
    torch.testing.assert_close(z_shard, expected[:, shard], rtol=1e-14, atol=1e-14)
    # each row's target column, gathered
    column, _ = rows.transform(
        x.gather(1, target.unsqueeze(1)), options, classes=target.unsqueeze(1), margin=margins[target].unsqueeze(1)
    )
    torch.testing.assert_close(column, expected.gather(1, target.unsqueeze(1)), rtol=1e-14, atol=1e-14)


def test_a_margin_without_its_rows_is_refused():
    options = RowLoss(target_margin=torch.ones(C))
    with pytest.raises(ValueError, match="margin"):
        rows.transform(torch.zeros(2, C), options)
    with pytest.raises(ValueError, match="target column"):
        rows.transform(torch.zeros(2, C), options, margin=torch.ones(2, 1))
