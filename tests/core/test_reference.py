"""The reference computation of a description (xent.core.reference) against each loss's own definition."""

import pytest
import torch

from tests import family_samples
from tests.conftest import assert_close
from xent.core import reference
from xent.kernels import dispatch
from xent.losses.family import FAMILY


@pytest.mark.parametrize(("name", "index"), family_samples.cases())
def test_the_description_reference_equals_each_plain_definition(name, index):
    """xent.core.reference computes any description; it must agree with every loss's own definition, which is what
    the fused kernels' extra gradients (class weights) are recomputed with."""
    loss_fn, options = FAMILY[name].function, family_samples.sample(name, index, family_samples.C)
    tensors = family_samples.problem(torch.float64, True, True)
    captured = {}

    def capture(logits, target, description, reduction, **_):
        captured.update(logits=logits, target=target, options=description)
        return torch.zeros(())

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(dispatch.IMPLEMENTATIONS, ("logits", "chunked"), capture)
        loss_fn(**tensors, impl="chunked", reduction="sum", **options)
    ours = reference.reference_loss(captured["logits"], captured["target"], captured["options"], "sum")
    expected = loss_fn(**tensors, impl="reference", reduction="sum", **options)
    assert_close(ours, expected, torch.float64)
