"""A variational auto-encoder on the embedded digits data, trained on ``xent.vae_loss`` (the negative ELBO).

python examples/vae.py            # ~15 s on 2 CPU cores; writes vae_samples.png every 25 epochs and at the end
python examples/vae.py --quick    # one short epoch
"""

from __future__ import annotations

import torch
from _common import load_digits_images, parse_args, run_epochs
from torch import nn

import xent

LATENT = 8


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 2 * LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, 128), nn.ReLU(), nn.Linear(128, 64))  # logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # (B, LATENT) each
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # the reparameterisation trick
        return self.decoder(z), mu, logvar


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_epochs=100, default_out="vae_samples.png")
    torch.manual_seed(args.seed)
    images = load_digits_images()  # (N, 64) in [0, 1]
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch_size = 64
    batches = 5 if args.quick else None

    def train_epoch() -> str:
        total, seen = 0.0, 0
        for index in list(torch.randperm(len(images)).split(batch_size))[:batches]:
            x = images[index]
            recon_logits, mu, logvar = model(x)
            loss = xent.vae_loss(recon_logits, x, mu, logvar, reduction="sum")
            optimizer.zero_grad()
            (loss / len(x)).backward()
            optimizer.step()
            total, seen = total + loss.item(), seen + len(x)
        return f"negative ELBO per image {total / seen:.3f}"

    @torch.no_grad()
    def sample() -> torch.Tensor:
        return torch.sigmoid(model.decoder(torch.randn(64, LATENT, generator=torch.Generator().manual_seed(args.seed))))

    run_epochs(args, train_epoch, sample, "VAE samples")


if __name__ == "__main__":
    main()
