"""The modules of the generative models' losses (:mod:`xent.nn`): :class:`GANDiscriminatorLoss`,
:class:`GANGeneratorLoss` and :class:`VAELoss`."""

from __future__ import annotations

from xent import losses
from xent.losses.generative import check_gan_options, check_vae_options
from xent.nn.base import _Loss


class GANDiscriminatorLoss(_Loss):
    """Module form of :func:`xent.gan_discriminator_loss`: ``forward(real_logits, fake_logits)``."""

    function = staticmethod(losses.gan_discriminator_loss)

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        label_smoothing = check_gan_options(reduction=reduction, label_smoothing=label_smoothing, discriminator=True)
        super().__init__(label_smoothing=label_smoothing, reduction=reduction)


class GANGeneratorLoss(_Loss):
    """Module form of :func:`xent.gan_generator_loss` (non-saturating): ``forward(fake_logits)``."""

    function = staticmethod(losses.gan_generator_loss)

    def __init__(self, reduction: str = "mean") -> None:
        check_gan_options(reduction=reduction)
        super().__init__(reduction=reduction)


class VAELoss(_Loss):
    """Module form of :func:`xent.vae_loss`: ``forward(recon_logits, x, mu, logvar)``."""

    function = staticmethod(losses.vae_loss)

    def __init__(self, beta: float = 1.0, reduction: str = "sum") -> None:
        beta = check_vae_options(beta=beta, reduction=reduction)
        super().__init__(beta=beta, reduction=reduction)
