"""The switch of the value checks that need a device→host sync (xent._config): on by default for CPU tensors."""

import pytest
import torch

import xent

LOGITS = torch.randn(8, 5)


def test_index_range_check_is_switchable():
    bad = torch.tensor([0, 1, 2, 3, 4, 7, 0, 0])
    with xent.value_checks(False):
        xent.cross_entropy(LOGITS, torch.where(bad > 4, 0, bad))  # fine
    with pytest.raises(ValueError, match="class index 7"):
        xent.cross_entropy(LOGITS, bad)
    xent.set_value_checks(False)
    try:
        # With the checks off nothing looks at the values: no host sync, and no error either.
        with pytest.raises((IndexError, RuntimeError)):
            xent.cross_entropy(LOGITS, bad)
    finally:
        xent.set_value_checks(None)
    with pytest.raises(TypeError, match="enabled must be True, False or None"):
        xent.set_value_checks("on")
