"""The GAN and VAE losses (xent.losses.generative) against their formulas, and their errors."""

import pytest
import torch

import xent
from tests.losses.formulas import REDUCTIONS, check


def test_gan_losses_match_formula():
    real = torch.randn(8, 1, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    expected = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    check(xent.gan_discriminator_loss(real, fake), expected, (real, fake))
    smoothed = -(0.9 * torch.log(torch.sigmoid(real)) + 0.1 * torch.log(1 - torch.sigmoid(real))).sum()
    smoothed = smoothed - torch.log(1 - torch.sigmoid(fake)).sum()
    check(xent.gan_discriminator_loss(real, fake, label_smoothing=0.1, reduction="sum"), smoothed, (real, fake))
    check(xent.gan_generator_loss(fake), -torch.log(torch.sigmoid(fake)).mean(), (fake,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 1.0, 4.0])
def test_vae_loss_is_negative_elbo(reduction, beta):
    recon = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.rand(4, 1, 3, 3, dtype=torch.float64)
    mu = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    p = torch.sigmoid(recon)
    bce = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum((1, 2, 3))
    # KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ (σ² + μ² − 1 − log σ²), per sample.
    kl = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum(1)
    per_sample = bce + beta * kl
    expected = {"none": per_sample, "mean": per_sample.mean(), "sum": per_sample.sum()}[reduction]
    check(xent.vae_loss(recon, x, mu, logvar, beta=beta, reduction=reduction), expected, (recon, mu, logvar))


# --- errors ----------------------------------------------------------------------------------------------------

LOGITS, TARGET = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: xent.vae_loss(LOGITS, torch.rand(4, 3), torch.randn(4, 2), torch.randn(4, 3)),
            ValueError,
            r"logvar has shape",
        ),
        (
            lambda: xent.vae_loss(LOGITS, torch.rand(4, 3), torch.randn(4, 2), torch.randn(4, 2), beta=-1),
            ValueError,
            r"beta must be in",
        ),
        (
            lambda: xent.gan_discriminator_loss(LOGITS, LOGITS, reduction="none"),
            ValueError,
            r"reduction must be one of 'mean', 'sum'",
        ),
    ],
)
def test_bad_hyperparameters(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: xent.vae_loss(torch.zeros(2, 3), torch.full((2, 3), 2.0), torch.zeros(2, 1), torch.zeros(2, 1)),
            r"^x must hold probabilities in \[0, 1\], found 2",
        ),
        (lambda: xent.vae_loss(None, torch.zeros(2), torch.zeros(2, 1), torch.zeros(2, 1)), r"^recon_logits must be"),
    ],
)
def test_errors_name_the_callers_argument(call, message):
    """Found by the fuzz layer: each error names the argument as the caller wrote it."""
    with pytest.raises((ValueError, TypeError), match=message):
        call()
