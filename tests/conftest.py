import pytest
import torch

# The repository's conftest.py switches Triton to its interpreter without a GPU, before anything imports xent.

# Tolerances of the parity requirement: relative 1e-9 in float64, 2e-5 in float32.
TOLERANCES = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tolerance = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, **tolerance)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
