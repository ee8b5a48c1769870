"""A variational auto-encoder on the embedded digits data, trained on ``xent.vae_loss`` (the negative ELBO).

python examples/vae.py            # ~30 s on 2 CPU cores; writes vae_samples.png
python examples/vae.py --quick    # one short epoch
"""

from __future__ import annotations

import time

import torch
from _common import load_digits_images, parse_args, save_grid
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
    epochs, batches = (1, 5) if args.quick else (args.epochs, None)
    start = time.perf_counter()
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for index in list(torch.randperm(len(images)).split(batch_size))[:batches]:
            x = images[index]
            recon_logits, mu, logvar = model(x)
            loss = xent.vae_loss(recon_logits, x, mu, logvar, reduction="sum")
            optimizer.zero_grad()
            (loss / len(x)).backward()
            optimizer.step()
            total, seen = total + loss.item(), seen + len(x)
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  negative ELBO per image {total / seen:.3f}")
    print(f"trained in {time.perf_counter() - start:.1f} s")
    with torch.no_grad():
        samples = torch.sigmoid(model.decoder(torch.randn(64, LATENT)))
    save_grid(samples, args.out, "VAE samples")


if __name__ == "__main__":
    main()
