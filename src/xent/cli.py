"""The ``xent`` command: a table of subcommands over typed library functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import xent


def _demo(args: argparse.Namespace) -> int:
    """Print the version and a worked example of the core losses."""
    import torch

    print(f"xent {xent.__version__} (torch {torch.__version__})")
    logits = torch.tensor([[4.0, 1.0, -2.0], [0.5, 2.5, 0.0], [1e4, -1e4, 0.0]], requires_grad=True)
    target = torch.tensor([0, 1, 2])
    print("\nlogits =", logits.detach().tolist())
    print("target =", target.tolist())
    loss = xent.cross_entropy(logits, target)
    loss.backward()
    reference = torch.nn.functional.cross_entropy(logits.detach(), target)
    print(f"xent.cross_entropy                      = {loss.item():.6f}   (torch: {reference.item():.6f})")
    print(f"  gradient finite at ±1e4 logits         : {bool(torch.isfinite(logits.grad).all())}")
    smoothed = xent.cross_entropy(logits.detach(), target, label_smoothing=0.1, z_loss=1e-4)
    print(f"  with label_smoothing=0.1, z_loss=1e-4  = {smoothed.item():.6f}")
    ignored = xent.cross_entropy(logits.detach(), torch.full_like(target, -100))
    print(f"  every target ignored                   = {ignored.item():.6f}   (torch: NaN)")
    bce = xent.binary_cross_entropy_with_logits(torch.tensor([3.0, -1.0]), torch.tensor([1.0, 0.0]))
    print(f"xent.binary_cross_entropy_with_logits   = {bce.item():.6f}")
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


COMMANDS: list[Command] = [
    ("demo", _no_arguments, _demo),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xent", description=xent.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"xent {xent.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=run.__doc__.splitlines()[0], description=run.__doc__)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `python -m xent` alone: the demo
        return _demo(args)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
