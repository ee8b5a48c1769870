"""A small GAN on the embedded digits data, trained with xent's GAN losses.

    python examples/gan.py            # ~20 s on 2 CPU cores; writes gan_samples.png every 25 epochs and at the end
    python examples/gan.py --quick    # one short epoch

The discriminator minimises ``xent.gan_discriminator_loss`` (real → 1 with one-sided label smoothing, fake → 0);
the generator minimises the non-saturating ``xent.gan_generator_loss``.
"""

from __future__ import annotations

import torch
from _common import load_digits_images, parse_args, run_epochs
from torch import nn

import xent

LATENT = 16


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_epochs=150, default_out="gan_samples.png")
    torch.manual_seed(args.seed)
    images = load_digits_images() * 2 - 1  # (N, 64) in [-1, 1], the generator's tanh range
    generator = nn.Sequential(nn.Linear(LATENT, 128), nn.LeakyReLU(0.2), nn.Linear(128, 64), nn.Tanh())
    discriminator = nn.Sequential(nn.Linear(64, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1))
    g_opt = torch.optim.Adam(generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    batch_size = 64
    batches = 5 if args.quick else None

    def train_epoch() -> str:
        d_total = g_total = 0.0
        steps = list(torch.randperm(len(images)).split(batch_size))[:batches]
        for index in steps:
            real = images[index]  # (B, 64)
            fake = generator(torch.randn(len(real), LATENT))  # (B, 64)

            d_loss = xent.gan_discriminator_loss(discriminator(real), discriminator(fake.detach()), label_smoothing=0.1)
            d_opt.zero_grad()
            d_loss.backward()
            d_opt.step()

            g_loss = xent.gan_generator_loss(discriminator(fake))
            g_opt.zero_grad()
            g_loss.backward()
            g_opt.step()
            d_total += d_loss.item() * len(real)
            g_total += g_loss.item() * len(real)
        seen = sum(len(index) for index in steps)
        return f"D loss {d_total / seen:.4f}  G loss {g_total / seen:.4f}"

    @torch.no_grad()
    def sample() -> torch.Tensor:
        return (generator(torch.randn(64, LATENT, generator=torch.Generator().manual_seed(args.seed))) + 1) / 2

    run_epochs(args, train_epoch, sample, "GAN samples")


if __name__ == "__main__":
    main()
