"""The registry of the fused family (xent.losses.family): a loss is found by its function or its name and refuses
options it does not have; every loss of the registry has sample options for the family-wide tests."""

import pytest
import torch

import xent
from tests import family_samples
from xent.losses.family import FAMILY


def test_every_loss_of_the_registry_has_samples():
    """A loss added to the registry fails here until tests/family_samples.py has options for it: the family-wide
    tests (fused kernels, ignored rows, gradient rule, vocab-parallel, modules) iterate the registry with them."""
    table = family_samples.samples(3)
    assert set(table) == set(FAMILY)
    for name, options in table.items():
        assert options, f"{name} has no samples"
        for sample in options:
            FAMILY[name].check_names(sample)  # each sample sets the loss's own options only


def test_linear_loss_finds_a_family_loss_by_function_or_name_and_refuses_others():
    tensors = family_samples.head_problem(torch.float64)
    del tensors["token_weight"], tensors["weight"]
    with pytest.raises(TypeError, match="binary_cross_entropy_with_logits; binary"):
        xent.linear_loss(xent.binary_cross_entropy_with_logits, **tensors)
    with pytest.raises(TypeError, match="got <lambda>"):
        xent.linear_loss(lambda x, y: x, **tensors)
    with pytest.raises(ValueError, match=r"loss must be one of .*'focal'"):
        xent.linear_loss("focal", **tensors)
    with pytest.raises(TypeError, match="focal_loss has no option 'q'; its options: alpha, gamma"):
        xent.linear_loss(xent.focal_loss, **tensors, q=0.5)
