"""Shared by the examples: the embedded digits data and a PNG grid of images."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def parse_args(description: str, default_epochs: int, default_out: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=default_epochs, help="passes over the data")
    parser.add_argument("--quick", action="store_true", help="one short epoch (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(default_out), help="PNG file for the sample grid")
    return parser.parse_args()


def load_digits_images() -> torch.Tensor:
    """scikit-learn's 1,797 handwritten digits, embedded in the package (no download), as (N, 64) in [0, 1]."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0


def save_grid(images: torch.Tensor, path: Path, title: str) -> None:
    """Save (K, 64) images in [0, 1] as a square grid of 8×8 digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = int(len(images) ** 0.5)
    figure, axes = plt.subplots(side, side, figsize=(side, side))
    for image, axis in zip(images[: side * side], axes.flat, strict=False):
        axis.imshow(image.view(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
        axis.axis("off")
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    print(f"saved {path}")
