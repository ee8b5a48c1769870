"""Temperature scaling (xent.losses.calibration): the fitted temperature minimises the NLL; its errors."""

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.losses.formulas import C


def test_fit_temperature_minimises_nll():
    generator = torch.Generator().manual_seed(3)
    calibrated = torch.randn(4000, C, generator=generator, dtype=torch.float64) * 2
    target = torch.multinomial(torch.softmax(calibrated, 1), 1, generator=generator).squeeze(1)  # labels ~ model
    overconfident = calibrated * 3.0  # the same model made 3× too sharp
    temperature = xent.fit_temperature(overconfident, target).item()
    grid = torch.linspace(0.5, 6.0, 5501, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(overconfident / t, target) for t in grid])
    assert temperature == pytest.approx(grid[nll.argmin()].item(), abs=2e-3)
    assert 2.5 < temperature < 3.5
    assert F.cross_entropy(overconfident / temperature, target) < F.cross_entropy(overconfident, target)


# --- errors ----------------------------------------------------------------------------------------------------

LOGITS, TARGET = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: xent.fit_temperature(LOGITS, TARGET, min_temperature=0), ValueError, r"min_temperature must be in"),
    ],
)
def test_bad_hyperparameters(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: xent.fit_temperature(None, torch.zeros(2)), r"^logits must be a torch.Tensor, got NoneType"),
    ],
)
def test_errors_name_the_callers_argument(call, message):
    """Found by the fuzz layer: each error names the argument as the caller wrote it."""
    with pytest.raises((ValueError, TypeError), match=message):
        call()
