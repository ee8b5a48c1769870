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


def in_float64(tensors: dict) -> dict:
    """The tensors of a problem with the floating-point ones in float64: the exact side of a float32 comparison."""
    return {key: value.double() if value.is_floating_point() else value for key, value in tensors.items()}


def assert_as_accurate_as_the_reference(actual, expected, exact, requires) -> None:
    """float32 results as close to the exact (float64) ones as the float32 reference, within 2e-5 relative. LDAM's
    s = 30 amplifies float32 rounding beyond that, in the reference as in the kernels. Each argument is a pair
    ``(loss, {name: gradient})`` as :func:`tests.test_gradient_rule.gradients` returns it."""
    for got, reference_value, truth in [(actual[0], expected[0], exact[0])] + [
        (actual[1][key], expected[1][key], exact[1][key]) for key in requires
    ]:
        reference_error = (reference_value.double() - truth).abs().max().item()
        tolerance = max(2e-5 * truth.abs().max().item() + 2e-6, 1.5 * reference_error)
        assert (got.double() - truth).abs().max().item() <= tolerance


@pytest.fixture(autouse=True)
def _kept_buffers_for_every_size(monkeypatch):
    """The fused kernels' kept CPU buffers (xent.kernels.buffers) serve every size in the tests, so that every
    kernel test also runs on buffers that held another call's values — a stale or shared buffer must fail the
    parity grid, not pass it for want of sizes above 16 MB."""
    from xent.kernels import buffers

    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    yield
    buffers.empty_cache()
