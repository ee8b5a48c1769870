"""The ``xent`` command: a table of subcommands over typed library functions."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import xent
from xent.losses.linear import LINEAR_LOSSES

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from xent.train.compare import Cell

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


BENCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "ce": {"n": 8192, "d": 0, "v": "32000"},
    "linear-ce": {"n": 4096, "d": 1024, "v": "32768"},
    "linear-distill": {"n": 4096, "d": 1024, "v": "32768"},
    "lm-step": {"n": 4096, "d": 256, "v": "16384"},  # examples/lm.py's model, 8 sequences of 512 tokens
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part]


def _console() -> Console:
    """A rich console; a log file or a pipe gets lines wide enough for our tables instead of 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=150)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from xent.bench.cases import DTYPES, OPERATIONS, SHAPES

    parser.add_argument(
        "operation",
        choices=OPERATIONS,
        help="ce: a loss on given logits; linear-ce: a loss of a linear head (--loss); "
        "linear-distill: distillation of one head into another; lm-step: a training step of a small Llama "
        "(hidden size --d, 4 layers) patched by xent.hf against the unpatched model (needs transformers)",
    )
    shape = parser.add_argument_group("problem")
    shape.add_argument("--n", type=_positive_int, help="rows / tokens (default 8192 for ce, 4096 for the others)")
    shape.add_argument("--d", type=_positive_int, help="hidden size; not for ce (default 1024; 256 for lm-step)")
    shape.add_argument("--v", type=_int_list, help="classes; a comma list sweeps V (default 32000 / 32768)")
    shape.add_argument("--dtype", choices=list(DTYPES), help="float32 by default (bfloat16 with --shape)")
    shape.add_argument("--shape", choices=list(SHAPES), help="a language-model head: sets --n, --d, --v and bfloat16")
    shape.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    shape.add_argument(
        "--loss",
        choices=list(LINEAR_LOSSES),
        default="cross_entropy",
        help="the family loss to measure (default cross_entropy); beside xent, its materialised reference, eager "
        "and under torch.compile",
    )
    run = parser.add_argument_group("run")
    from xent.bench.cases import IMPLEMENTATIONS
    from xent.bench.load import SPINNERS_PER_CORE

    names = "; ".join(f"{op}: {', '.join(i.name for i in impls)}" for op, impls in IMPLEMENTATIONS.items())
    run.add_argument("--impl", help=f"comma list of implementations to run (default: all that are available) — {names}")
    run.add_argument(
        "--repeat",
        type=_positive_int,
        default=3,
        help="interleaved timed runs, at least 3; the table shows their median (default %(default)s)",
    )
    run.add_argument(
        "--contend",
        type=int,
        default=0,
        metavar="K",
        help="run K spinning processes beside the measurement, to see each implementation on a busy machine "
        f"(default %(default)s; at most {SPINNERS_PER_CORE} per core)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--csv", type=Path, help="write every measurement to this CSV file")
    output.add_argument("--plot", type=Path, help="write time and memory against V to this PNG file")


def _bench(args: argparse.Namespace) -> int:
    """Time and measure every implementation of a loss side by side."""
    import torch

    from xent.bench import Problem, run_bench
    from xent.bench.cases import LM_BATCH, SHAPES
    from xent.bench.load import busy_warning, check_spinners
    from xent.bench.report import plot, print_table, write_csv

    defaults = {**BENCH_DEFAULTS[args.operation], "dtype": "float32"}
    if args.shape is not None:
        preset = SHAPES[args.shape]
        defaults = {**defaults, **preset, "v": str(preset["v"])}
    if args.repeat < 3:
        raise CommandError(f"--repeat must be at least 3 for a median of interleaved runs, got {args.repeat}")
    try:
        check_spinners(args.contend)
    except ValueError as error:
        raise CommandError(str(error)) from None
    if args.loss != "cross_entropy" and args.operation == "linear-distill":
        raise CommandError("--loss applies to ce and linear-ce; linear-distill measures linear_distillation_loss")
    if args.operation == "lm-step" and args.shape is not None:
        raise CommandError("--shape sets a head's shape; lm-step builds a model: give --n, --d and --v")
    if args.operation == "lm-step" and (args.n or defaults["n"]) % LM_BATCH:
        raise CommandError(f"--n for lm-step must be a multiple of {LM_BATCH} (sequences per step), got {args.n}")
    if (args.d is not None or args.shape is not None) and args.operation == "ce":
        raise CommandError(f"--{'d' if args.d is not None else 'shape'} applies to linear-ce only")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available")
    vocab_sizes = args.v or _int_list(defaults["v"])
    names = [name for name in args.impl.split(",") if name] if args.impl else None
    console = _console()
    busy = busy_warning()  # before any of the bench's own processes, spinners included, add to the load
    if busy:
        console.print(f"[bold yellow]warning:[/] {busy}")
    everything = []
    for vocab in vocab_sizes:
        dtype = args.dtype or defaults["dtype"]
        problem = Problem(
            args.operation, args.n or defaults["n"], args.d or defaults["d"], vocab, dtype, device, args.loss
        )
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


class CommandError(Exception):
    """A bad flag or value: printed as one line naming the flag, exit status 2, no traceback."""


STUDY_OWNED = ("out", "name", "resume", "quiet", "seed", "loss")  # set per run by xent compare, not shared flags


def _train_arguments(parser: argparse.ArgumentParser, *, shared: bool = False) -> None:
    """One flag per field of :class:`xent.train.TrainConfig`, grouped and documented by its metadata; only the flags
    given are set on the namespace (the configuration holds the defaults), so that a flag given at its default value
    still counts as given. ``shared``: the flags as settings of every run of a study — the run's own place,
    resumption and verbosity are the study's."""
    import dataclasses
    import typing

    from xent.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(TrainConfig):
        if shared and field.name in STUDY_OWNED:
            continue
        group_name = field.metadata["group"]
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = field.default
        help_text = field.metadata["help"] + ("" if default in (None, False) else f" (default {default})")
        if shared:
            help_text = field.metadata["help"]
        if kind is bool:
            group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        group.add_argument(flag, type=base, default=argparse.SUPPRESS, metavar=field.name.upper(), help=help_text)


def _train(args: argparse.Namespace) -> int:
    """Train a classifier (default: an MLP on the embedded digits data)."""
    import dataclasses

    from xent.train import ConfigError, TrainConfig, TrainingDiverged, train
    from xent.train.checkpoint import LAST
    from xent.train.config import refuse_unread_flags
    from xent.train.loop import Interrupted

    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)
             if hasattr(args, field.name)}  # fmt: skip
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


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by xent train")
    parser.add_argument("--data", help="evaluate on another data set of the same shape and classes")
    parser.add_argument("--data-dir", help="directory of the data files, if --data needs them")
    parser.add_argument(
        "--temperature-scale",
        action="store_true",
        help="fit a temperature on the validation split (minimising NLL); report test NLL and ECE before and after, "
        "and save them with the temperature to RUN_DIR/calibration.json",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")


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


DEFAULT_JOBS = max(1, min(4, os.cpu_count() or 1))


def _numbers(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    from xent.train.compare import STUDIES

    study = parser.add_argument_group("study")
    study.add_argument(
        "--study",
        default="long-tail",
        choices=list(STUDIES),
        help="; ".join(f"{name}: {s.question}" for name, s in STUDIES.items()).replace("%", "%%")
        + " (default long-tail)",
    )
    study.add_argument(
        "--losses",
        type=lambda text: [v for v in text.split(",") if v.strip()],
        help="losses of --loss, comma-separated, each NAME or NAME:FLAG=VALUE "
        "(e.g. ce,ce:label-smoothing=0.1,focal:gamma=1); default: the study's",
    )
    study.add_argument("--seeds", type=int, default=3, help="seeds per loss (default 3)")
    study.add_argument("--imbalance-ratios", type=_numbers, help="a grid over --imbalance-ratio, e.g. 10,100")
    study.add_argument("--label-noises", type=_numbers, help="a grid over --label-noise, e.g. 0.2,0.4")
    study.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                       help=f"runs trained at once, by as many worker processes, each training one run after another "
                            f"with cores/JOBS threads (default {DEFAULT_JOBS}: the CPU cores, at most 4)")  # fmt: skip
    study.add_argument("--out", type=Path, help="the study directory (default runs/compare-STUDY); an existing "
                       "one is resumed: finished cells are kept")  # fmt: skip
    _train_arguments(parser, shared=True)


def _compare(args: argparse.Namespace) -> int:
    """Run a loss study: losses × seeds on one data set, then a table, plots and a report."""
    import dataclasses
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from xent.train.compare import build_grid, lock_study, run_grid
    from xent.train.config import ConfigError, TrainConfig
    from xent.train.loop import Interrupted
    from xent.train.progress import cells_eta_column
    from xent.train.report import findings, table, write_study

    if args.jobs < 1:
        raise CommandError(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and getattr(args, "workers", 0) > 0:
        raise CommandError(f"--workers {args.workers} starts loader processes, which a --jobs worker process cannot: "
                           "use --jobs 1 with --workers, or leave --workers at 0")  # fmt: skip
    given = [name for name in ("imbalance_ratios", "label_noises") if getattr(args, name)]
    if len(given) > 1:
        raise CommandError("give one of --imbalance-ratios and --label-noises: a study varies one setting")
    varying = None
    if given:
        varying = ({"imbalance_ratios": "imbalance_ratio", "label_noises": "label_noise"}[given[0]],
                   getattr(args, given[0]))  # fmt: skip
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                if hasattr(args, f.name) and f.name not in STUDY_OWNED}  # fmt: skip
    directory = args.out or Path("runs") / f"compare-{args.study}"
    try:
        grid = build_grid(directory, study=args.study, losses=args.losses, seeds=args.seeds, varying=varying,
                          settings=settings)  # fmt: skip
    except ConfigError as error:
        raise CommandError(str(error)) from None
    console = _console()
    cells = grid.cells()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               cells_eta_column())  # fmt: skip
    try:
        with lock_study(directory):  # one process per study directory: a second is refused, naming the first
            console.print(f"xent compare {grid.name}: {len(grid.variants)} losses × {len(grid.seeds)} seeds"
                          + (f" × {len(grid.varying[1])} values of {grid.varying[0]}" if grid.varying else "")
                          + f" = {len(cells)} runs in {directory}")  # fmt: skip
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task("cells", total=len(cells), started=None, to_train=0, trained=0)

                def start(to_train: int) -> None:  # the ETA counts the cells trained from here on
                    progress.update(task, started=time.monotonic(), to_train=to_train)

                def done(cell: Cell, row: dict[str, Any]) -> None:
                    fields = progress.tasks[task].fields
                    if fields["started"] is not None:
                        progress.update(task, trained=fields["trained"] + 1)
                    progress.advance(task)
                    line = (f"  {cell.directory.name}: accuracy {100 * row['accuracy']:.2f}%, balanced "
                            f"{100 * row['balanced_accuracy']:.2f}%, ECE {row['ece']:.3f}")  # fmt: skip
                    progress.console.print(line)

                rows = run_grid(grid, jobs=args.jobs, on_done=done, on_start=start)
            summary, unwritten = write_study(grid, rows)
    except ConfigError as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        raise CommandError(f"cannot write the study: {where}{error.strerror or error}") from None
    except (KeyboardInterrupt, Interrupted):  # Interrupted: Ctrl-C inside a run trained in this process
        print(f"xent compare: interrupted; run the same command again to continue (finished cells in {directory} "
              "are kept)", file=sys.stderr)  # fmt: skip
        return 130
    if unwritten:  # a finished study in a read-only directory, say: the results below are still its runs'
        names = ", ".join(os.path.relpath(e.filename, directory) if e.filename else str(e) for e in unwritten)
        print(f"xent compare: could not write {names} in {directory} ({unwritten[0].strerror or unwritten[0]}); "
              "the table and findings below are read from its runs", file=sys.stderr)  # fmt: skip
    console.print(table(grid, summary))
    for sentence in findings(grid, summary, rows):
        console.print(f"• {sentence}")
    console.print(f"report: {directory / 'report.html'} (and report.md, results.csv, summary.csv, plots/)")
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


COMMANDS: list[Command] = [
    ("train", _train_arguments, _train),
    ("eval", _eval_arguments, _eval),
    ("compare", _compare_arguments, _compare),
    ("bench", _bench_arguments, _bench),
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
