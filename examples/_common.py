"""Shared by the examples: the embedded digits data, the epoch loop's progress and a PNG grid of images."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

LINE_EVERY = 10  # epochs between two printed lines (a terminal also gets a progress bar of every epoch)


def parse_args(description: str, default_epochs: int, default_out: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=default_epochs, help="passes over the data")
    parser.add_argument("--quick", action="store_true", help="one short epoch (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(default_out), help="PNG file for the sample grid")
    parser.add_argument("--save-every", type=int, default=25, metavar="N",
                        help="also save the sample grid every N epochs, so that a stopped run leaves one")  # fmt: skip
    args = parser.parse_args()
    for flag, value in (("--epochs", args.epochs), ("--save-every", args.save_every)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    return args


def load_digits_images() -> torch.Tensor:
    """scikit-learn's 1,797 handwritten digits, embedded in the package (no download), as (N, 64) in [0, 1]."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0


def run_epochs(args: argparse.Namespace, train_epoch: Callable[[], str], sample: Callable[[], torch.Tensor],
               title: str) -> None:  # fmt: skip
    """Call ``train_epoch()`` (it returns the epoch's losses as text) for every epoch, showing progress, and save
    ``sample()`` as a grid every ``--save-every`` epochs and at the end. Ctrl-C stops with the last grid kept.

    The models are two layers of 128 units, whose products are too small to share between threads: one thread is
    as fast on an idle machine, and does not wait on a busy second core (two threads took 2 minutes there, one 20 s).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    torch.set_num_threads(1)
    epochs = 1 if args.quick else args.epochs
    console = Console(soft_wrap=True, markup=False)  # paths as written: never wrapped, never read as markup
    columns = (TextColumn("epoch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn())  # fmt: skip
    start, epoch, saved = time.perf_counter(), 1, "no grid was saved yet"
    try:
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("", total=epochs, status="")
            for epoch in range(1, epochs + 1):
                losses = train_epoch()
                bar.update(task, advance=1, status=losses)
                if epoch % LINE_EVERY == 1 or epoch == epochs:
                    console.print(f"epoch {epoch:3d}  {losses}")
                if epoch % args.save_every == 0 or epoch == epochs:
                    save_grid(sample(), args.out, f"{title}, epoch {epoch}")
                    saved = f"{args.out} holds the samples of epoch {epoch}"
                    console.print(f"saved {args.out} (epoch {epoch})")
    except KeyboardInterrupt:
        console.print(f"interrupted in epoch {epoch}; {saved}")
        sys.exit(130)
    console.print(f"trained in {time.perf_counter() - start:.1f} s")


def save_grid(images: torch.Tensor, path: Path, title: str) -> None:
    """Save (K, 64) images in [0, 1] as a square grid of 8×8 digits, one picture (fast enough to save often);
    atomically, so that a stopped run never leaves half a file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = int(len(images) ** 0.5)
    tiles = torch.nn.functional.pad(images[: side * side].view(side, side, 8, 8), (1, 1, 1, 1))  # a blank border
    grid = tiles.permute(0, 2, 1, 3).reshape(side * 10, side * 10)  # (rows of tiles × 10, columns of tiles × 10)
    figure, axis = plt.subplots(figsize=(side, side))
    axis.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
    axis.axis("off")
    axis.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, dpi=80, format="png")
    plt.close(figure)
    os.replace(temporary, path)


def return_freed_memory() -> None:
    """Have glibc's malloc give blocks of 128 KiB and more back to the kernel as soon as they are freed (a fixed mmap
    threshold; by default it rises and freed blocks stay resident), so that what is resident is what is in use."""
    ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def resident_bytes(field: str) -> int:
    """A field of /proc/self/status (``VmRSS``: resident now, ``VmHWM``: its high-water mark) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)
