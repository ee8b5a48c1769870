"""Cross-entropy losses of generative models: the GAN's discriminator and generator, and the VAE's negative ELBO."""

from __future__ import annotations

import torch

from xent.core.autocast import float32_under_autocast
from xent.core.reduce import accumulation_dtype
from xent.losses import checks
from xent.losses.sigmoid import binary_cross_entropy_with_logits, check_binary_pair


def check_gan_options(*, reduction: str, label_smoothing: float = 0.0, discriminator: bool = False) -> float:
    """The options of the GAN losses (and their modules), checked; the discriminator has no ``"none"``."""
    checks.check_reduction(reduction, ("mean", "sum") if discriminator else checks.REDUCTIONS)
    return checks.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)


def check_vae_options(*, beta: float, reduction: str) -> float:
    """The options of :func:`vae_loss` (and its module), checked."""
    checks.check_reduction(reduction)
    return checks.check_in_range("beta", beta, 0.0)


@float32_under_autocast
def gan_discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, *, label_smoothing: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    r"""The GAN discriminator's loss: real samples classified 1, generated ones 0.

    .. math::
        \mathcal{L}_D = \operatorname{BCE}(D(x), 1 - \varepsilon) + \operatorname{BCE}(D(G(z)), 0)

    Each term is reduced separately, so real and fake batches may differ in size. ``label_smoothing`` is *one-sided*
    (Salimans et al., 2016): only the real targets move to :math:`1 - \varepsilon`, which stops the discriminator
    from becoming over-confident without rewarding the generator for samples far from the data.

    Args:
        real_logits: discriminator logits on real samples, any shape.
        fake_logits: discriminator logits on generated samples, any shape.
        label_smoothing: :math:`\varepsilon \in [0, 1]`; default 0.
        reduction: ``"mean"`` | ``"sum"`` (``"none"`` has no common shape for the two terms).

    References:
        Goodfellow, Pouget-Abadie, Mirza, et al. Generative Adversarial Nets. NeurIPS 2014.
        Salimans, Goodfellow, Zaremba, et al. Improved Techniques for Training GANs. NeurIPS 2016.
    """
    label_smoothing = check_gan_options(reduction=reduction, label_smoothing=label_smoothing, discriminator=True)
    real_target = torch.full_like(checks.check_floating("real_logits", real_logits), 1.0 - label_smoothing)
    fake_target = torch.zeros_like(checks.check_floating("fake_logits", fake_logits))
    real = binary_cross_entropy_with_logits(real_logits, real_target, reduction=reduction)
    return real + binary_cross_entropy_with_logits(fake_logits, fake_target, reduction=reduction)


@float32_under_autocast
def gan_generator_loss(fake_logits: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    r"""The non-saturating GAN generator loss: :math:`\operatorname{BCE}(D(G(z)), 1) = -\log D(G(z))`.

    Goodfellow et al. propose it instead of minimising :math:`\log(1 - D(G(z)))`, whose gradient vanishes early in
    training when the discriminator rejects every sample.

    Args:
        fake_logits: discriminator logits on generated samples, any shape.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    References:
        Goodfellow, Pouget-Abadie, Mirza, et al. Generative Adversarial Nets. NeurIPS 2014.
    """
    check_gan_options(reduction=reduction)
    fake_logits = checks.check_floating("fake_logits", fake_logits)
    return binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits), reduction=reduction)


@float32_under_autocast
def vae_loss(
    recon_logits: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    beta: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    r"""The VAE's negative ELBO with a Bernoulli decoder and a standard normal prior.

    .. math::
        \mathcal{L}_n = \sum_i \operatorname{BCE}(\hat{x}_{n,i}, x_{n,i})
            + \beta \cdot \underbrace{-\tfrac{1}{2} \sum_j \bigl(1 + \log\sigma^2_{n,j} - \mu^2_{n,j}
            - \sigma^2_{n,j}\bigr)}_{\mathrm{KL}(\mathcal{N}(\mu_n, \sigma_n^2) \,\|\, \mathcal{N}(0, I))}

    The reconstruction term is computed on the decoder's logits (not on sigmoid outputs), which is exact where a
    probability would have rounded to 0 or 1. :math:`\beta = 1` is the ELBO; :math:`\beta > 1` is the β-VAE.

    Args:
        recon_logits: decoder logits ``(N, ...)``.
        x: data in [0, 1], the shape of ``recon_logits``.
        mu, logvar: the encoder's mean and log-variance ``(N, latent)``.
        beta: weight :math:`\beta \ge 0` of the KL term; default 1.
        reduction: ``"sum"`` over the batch (the default, as in Kingma & Welling), ``"mean"`` over the batch
            (per sample), or ``"none"`` (``(N,)``).

    References:
        Kingma, Welling. Auto-Encoding Variational Bayes. ICLR 2014.
        Higgins, Matthey, Pal, et al. beta-VAE. ICLR 2017.
    """
    beta = check_vae_options(beta=beta, reduction=reduction)
    recon_logits, x = check_binary_pair(recon_logits, x, names=("recon_logits", "x"))
    mu = checks.check_floating("mu", mu)
    logvar = checks.check_floating("logvar", logvar)
    if mu.shape != logvar.shape:
        raise ValueError(
            f"logvar has shape {checks.shape_str(logvar.shape)} but mu has shape {checks.shape_str(mu.shape)}; "
            "they must be equal"
        )
    if recon_logits.dim() == 0 or mu.dim() == 0 or mu.shape[0] != recon_logits.shape[0]:
        raise ValueError(
            f"mu of shape {checks.shape_str(mu.shape)} and recon_logits of shape "
            f"{checks.shape_str(recon_logits.shape)} must share the batch dimension N"
        )
    reconstruction = binary_cross_entropy_with_logits(recon_logits, x, reduction="none")
    reconstruction = reconstruction.to(accumulation_dtype(reconstruction.dtype)).flatten(1).sum(1)  # (N,)
    mu, logvar = mu.to(reconstruction.dtype), logvar.to(reconstruction.dtype)
    kl = -0.5 * (1.0 + logvar - mu.square() - logvar.exp()).flatten(1).sum(1)  # (N,)
    loss = reconstruction + beta * kl
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.mean()
    return loss.to(recon_logits.dtype)
