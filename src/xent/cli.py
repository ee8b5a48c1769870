"""The ``xent`` command: a table of subcommands over typed library functions.

Each command is its flags (:mod:`xent.train.flags`, :mod:`xent.bench.flags`) and a function here that turns them
into one call of the library — :func:`xent.train.train`, :func:`xent.train.run_study`, :func:`xent.bench.run_bench`
— and prints what it returns. A bad flag is one line naming it, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import xent
from xent.bench.flags import add_bench_arguments
from xent.train.flags import add_compare_arguments, add_eval_arguments, add_train_arguments

if TYPE_CHECKING:
    import torch
    from rich.console import Console


class CommandError(Exception):
    """A bad flag or value: printed as one line naming the flag, exit status 2, no traceback."""


FLOAT32_RTOL = 2e-5  # the parity requirement with PyTorch in float32 (README, "Differences from PyTorch")


def _relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|, in float64: 0 when equal, ~1e-7 for float32 values one rounding apart."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-300))


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
    torch_logits = logits.detach().clone().requires_grad_()
    reference = torch.nn.functional.cross_entropy(torch_logits, target)
    reference.backward()
    print(f"xent.cross_entropy                      = {loss.item():.6f}   (torch: {reference.item():.6f})")
    # float32 sums taken in another order round differently: equal up to the tolerance, not to the last digit
    differences = [  # with the gradients backward() has just set
        _relative_difference(loss, reference),
        _relative_difference(cast(torch.Tensor, logits.grad), cast(torch.Tensor, torch_logits.grad)),
    ]
    verdict = "within" if max(differences) <= FLOAT32_RTOL else "OUTSIDE"
    print(f"  relative difference from torch         : loss {differences[0]:.1e}, gradient {differences[1]:.1e} "
          f"({verdict} the float32 tolerance {FLOAT32_RTOL:g})")  # fmt: skip
    print(f"  gradient finite at ±1e4 logits         : {bool(torch.isfinite(cast(torch.Tensor, logits.grad)).all())}")
    smoothed = xent.cross_entropy(logits.detach(), target, label_smoothing=0.1, z_loss=1e-4)
    print(f"  with label_smoothing=0.1, z_loss=1e-4  = {smoothed.item():.6f}")
    ignored = xent.cross_entropy(logits.detach(), torch.full_like(target, -100))
    print(f"  every target ignored                   = {ignored.item():.6f}   (torch: NaN)")
    bce = xent.binary_cross_entropy_with_logits(torch.tensor([3.0, -1.0]), torch.tensor([1.0, 0.0]))
    print(f"xent.binary_cross_entropy_with_logits   = {bce.item():.6f}")
    return 0


def _console() -> Console:
    """A rich console; a log file or a pipe gets lines wide enough for our tables instead of 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=150)


def _bench(args: argparse.Namespace) -> int:
    """Time and measure every implementation of a loss side by side."""
    from xent.bench import run_bench
    from xent.bench.flags import problems
    from xent.bench.load import busy_warning
    from xent.bench.report import plot, print_table, write_csv

    try:
        wanted = problems(args)
    except ValueError as error:
        raise CommandError(str(error)) from None
    names = [name for name in args.impl.split(",") if name] if args.impl else None
    console = _console()
    busy = busy_warning()  # before any of the bench's own processes, spinners included, add to the load
    if busy:
        console.print(f"[bold yellow]warning:[/] {busy}")
    everything = []
    for problem in wanted:
        try:
            with console.status("starting") as status:
                measurements = run_bench(
                    problem, names, repeat=args.repeat, contend=args.contend, progress=status.update
                )
        except ValueError as error:
            raise CommandError(str(error)) from None
        print_table(measurements, console)
        everything.extend(measurements)
    if args.csv:
        write_csv(args.csv, everything)
        console.print(f"wrote {args.csv}")
    if args.plot:
        plot(args.plot, everything)
        console.print(f"wrote {args.plot}")
    return 0


def _train(args: argparse.Namespace) -> int:
    """Train a classifier (default: an MLP on the embedded digits data)."""
    from xent.train import ConfigError, TrainConfig, TrainingDiverged, train
    from xent.train.checkpoint import LAST
    from xent.train.config import refuse_unread_flags
    from xent.train.flags import given_settings
    from xent.train.loop import Interrupted

    given = given_settings(args)
    config = TrainConfig(**given)
    try:
        if config.resume is None:  # a resumed run reads its loss's settings from its config.json
            refuse_unread_flags(config.loss, given)
        train(config, _console())
    except ConfigError as error:
        raise CommandError(str(error)) from None
    except OSError as error:  # the run directory cannot be written: a full disk, a read-only or missing place
        where = f"{error.filename}: " if error.filename else ""
        raise CommandError(f"cannot write the run: {where}{error.strerror or error}") from None
    except TrainingDiverged as error:
        print(f"xent train: {error}", file=sys.stderr)
        return 3
    except Interrupted as interrupted:
        if (interrupted.directory / LAST).is_file():
            way_on = f"continue with: xent train --resume {interrupted.directory}"
        else:
            way_on = "no epoch had finished, so there is no checkpoint to resume from"
        print(f"xent train: interrupted; {way_on}", file=sys.stderr)
        return 130
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Reload a run's best checkpoint and print its test metrics."""
    import json

    from xent.train import ConfigError
    from xent.train.evaluate import evaluate_run

    try:
        result = evaluate_run(args.run_dir, data=args.data, data_dir=args.data_dir,
                              temperature_scale=args.temperature_scale)  # fmt: skip
    except ConfigError as error:
        raise CommandError(str(error)) from None
    except OSError as error:  # calibration.json cannot be written
        where = f"{error.filename}: " if error.filename else ""
        raise CommandError(f"cannot write the calibration: {where}{error.strerror or error}") from None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"{result['run_dir']} — best epoch {result['epoch']}, test split of {result['data']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "nll", "ece", "brier", "loss"):
        value = result[key]
        table.add_row(key, f"{100 * value:.2f}%" if "accuracy" in key else f"{value:.4f}")
    for name, value in result["per_class_accuracy"].items():
        table.add_row(f"accuracy of class {name}", "n/a (no test example)" if value is None else f"{100 * value:.2f}%")
    if "temperature" in result:
        table.add_row("fitted temperature", f"{result['temperature']:.4f}")
        table.add_row("NLL before → after", f"{result['nll_before']:.4f} → {result['nll_after']:.4f}")
        table.add_row("ECE before → after", f"{result['ece_before']:.4f} → {result['ece_after']:.4f}")
    console = _console()
    console.print(table)
    if "temperature" in result and result["ece_after"] > result["ece_before"]:
        console.print("ECE rose: the temperature minimises NLL on the validation split, not ECE, and a model that is "
                      "already calibrated can lose ECE to it")  # fmt: skip
    return 0


def _compare(args: argparse.Namespace) -> int:
    """Run a loss study: losses × seeds on one data set, then a table, plots and a report."""
    from xent.train.compare import run_study
    from xent.train.config import ConfigError
    from xent.train.flags import STUDY_OWNED, given_settings, varying_setting
    from xent.train.loop import Interrupted
    from xent.train.progress import StudyProgress
    from xent.train.report import table

    try:
        varying = varying_setting(args)
    except ValueError as error:
        raise CommandError(str(error)) from None
    directory = args.out or Path("runs") / f"compare-{args.study}"
    console = _console()
    try:
        with StudyProgress(console) as progress:
            result = run_study(args.study, out=directory, losses=args.losses, seeds=args.seeds, varying=varying,
                               settings=given_settings(args, leave_out=STUDY_OWNED), jobs=args.jobs,
                               on_begin=progress.begin, on_start=progress.start, on_done=progress.done)  # fmt: skip
    except ConfigError as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        raise CommandError(f"cannot write the study: {where}{error.strerror or error}") from None
    except (KeyboardInterrupt, Interrupted):  # Interrupted: Ctrl-C inside a run trained in this process
        print(f"xent compare: interrupted; run the same command again to continue (finished cells in {directory} "
              "are kept)", file=sys.stderr)  # fmt: skip
        return 130
    if result.unwritten:  # a finished study in a read-only directory, say: the results below are still its runs'
        unwritten = result.unwritten
        names = ", ".join(os.path.relpath(e.filename, directory) if e.filename else str(e) for e in unwritten)
        print(f"xent compare: could not write {names} in {directory} ({unwritten[0].strerror or unwritten[0]}); "
              "the table and findings below are read from its runs", file=sys.stderr)  # fmt: skip
    console.print(table(result.grid, result.summary))
    for sentence in result.findings:
        console.print(f"• {sentence}")
    console.print(f"report: {directory / 'report.html'} (and report.md, results.csv, summary.csv, plots/)")
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


COMMANDS: list[Command] = [
    ("train", add_train_arguments, _train),
    ("eval", add_eval_arguments, _eval),
    ("compare", add_compare_arguments, _compare),
    ("bench", add_bench_arguments, _bench),
    ("demo", _no_arguments, _demo),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xent", description=xent.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"xent {xent.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add_arguments, run in COMMANDS:
        # every command function has a docstring
        sub = subparsers.add_parser(name, help=cast(str, run.__doc__).splitlines()[0], description=run.__doc__)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


# The optional packages each extra brings (import name: distribution name); a command's own extra comes first.
EXTRAS: dict[str, dict[str, str]] = {
    "train": {"rich": "rich", "matplotlib": "matplotlib", "sklearn": "scikit-learn", "torchmetrics": "torchmetrics",
              "kornia": "kornia", "mnist1d": "mnist1d", "PIL": "Pillow"},
    "bench": {"rich": "rich", "matplotlib": "matplotlib", "psutil": "psutil"},
    "hf": {"transformers": "transformers", "accelerate": "accelerate"},
    "triton": {"triton": "triton"},
}  # fmt: skip
COMMAND_EXTRA = {"train": "train", "eval": "train", "compare": "train", "bench": "bench"}


def missing_extra(command: str, error: ModuleNotFoundError) -> str | None:
    """The one line that says which extra installs the package ``error`` misses, or None for a package no extra
    brings (a bug, not an install to complete)."""
    import re

    found = error.name or next(iter(re.findall(r"No module named '([^']+)'", str(error))), "")  # a worker's: no name
    module = found.split(".")[0]
    own = COMMAND_EXTRA.get(command)
    for extra in ([own] if own else []) + list(EXTRAS):
        if module in EXTRAS[extra]:
            package = EXTRAS[extra][module]
            named = module if package == module else f"{module} ({package})"
            return f'{named} is not installed; xent {command} needs the "{extra}" extra: pip install "xent[{extra}]"'
    return None


def _require_extra(command: str) -> None:
    """Raise ModuleNotFoundError for the first package of the command's extra that is not installed: found up front
    (``find_spec`` imports nothing), not when a lazily imported library is first needed, after minutes of work."""
    import importlib.util

    for module in EXTRAS.get(COMMAND_EXTRA.get(command, ""), {}):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `python -m xent` alone: the demo
        return _demo(args)
    try:
        _require_extra(args.command)
        return cast(int, args.run(args))
    except CommandError as error:
        print(f"xent {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:  # a core-only install (pip install xent) running a command of an extra
        line = missing_extra(args.command, error)
        if line is None:
            raise
        print(f"xent {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
