"""``xent compare``: a loss study — a grid of losses × seeds (× imbalance ratios or noise rates) trained with the
trainer's own API, one run directory per cell, aggregated into tables, plots and a report.

A study directory holds ``study.json`` (the grid), ``runs/CELL/`` (a run directory of ``xent train`` each, plus
``calibration.json``: test NLL and ECE before and after temperature scaling fitted on the validation split),
``results.csv`` (one row per cell), ``summary.csv`` (mean and standard deviation over seeds), ``plots/`` and
``report.html``/``report.md``. Everything after training is recomputed from the run directories, so an interrupted
study resumes where it stopped: finished cells are kept, a cell killed mid-run continues from its last checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import statistics
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from xent.train.config import ConfigError, TrainConfig, resolve
from xent.train.losses import LOSSES

# Each metric of the report: (column in results.csv, heading, higher is better, shown as a percentage)
METRICS: list[tuple[str, str, bool, bool]] = [
    ("accuracy", "accuracy", True, True),
    ("balanced_accuracy", "balanced acc.", True, True),
    ("macro_f1", "macro-F1", True, False),
    ("nll", "NLL", False, False),
    ("ece", "ECE", False, False),
    ("ece_after_ts", "ECE after TS", False, False),
    ("train_seconds", "train s", False, False),
]
VARYING = {"imbalance_ratio": "--imbalance-ratios", "label_noise": "--label-noises"}
DIVERGED = "diverged.json"  # a cell whose loss became NaN or infinite: a result (NaN metrics), not a crash


@dataclass(frozen=True)
class Variant:
    """A loss of the grid: a trainer loss and the flags that set it apart, written ``NAME[:FLAG=VALUE...]``
    (``ce:label-smoothing=0.1`` is cross-entropy with label smoothing)."""

    label: str
    loss: str
    options: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, *assignments = text.strip().split(":")
        if name not in LOSSES:
            raise ConfigError(f"--losses {text}: unknown loss {name!r}; choose from {', '.join(LOSSES)}")
        options: dict[str, float] = {}
        hints = typing.get_type_hints(TrainConfig)
        for assignment in assignments:
            flag, equals, value = assignment.partition("=")
            key = flag.strip().lstrip("-").replace("-", "_")
            if not equals or key not in LOSSES[name].flags:
                reads = ", ".join("--" + f.replace("_", "-") for f in LOSSES[name].flags) or "no flag"
                raise ConfigError(f"--losses {text}: {name} takes FLAG=VALUE for the flags it reads ({reads})")
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"--losses {text}: {flag}={value!r} is not a number") from None
            if int in (hints[key], *typing.get_args(hints[key])):  # an epoch, not a rate
                if not number.is_integer():
                    raise ConfigError(f"--losses {text}: {flag} takes a whole number, got {value}")
                number = int(number)
            options[key] = number
        # one spelling per variant: "ce: label-smoothing=0.10" is "ce:label-smoothing=0.1"
        label = name + "".join(f":{key.replace('_', '-')}={value:g}" for key, value in options.items())
        return cls(label, name, options)


@dataclass(frozen=True)
class Study:
    question: str
    losses: tuple[str, ...]
    settings: dict[str, Any]  # TrainConfig fields the study sets (a user's flag overrides them)
    headline: str  # the metric the question is about
    varying: tuple[str, tuple[float, ...]] | None = None


# Defaults that finish in about 1-3 minutes each on 2 CPU cores (two runs at a time) and show the published effects
# beyond one standard deviation over 3 seeds (measured, see README "Choosing a loss"): long-tailed digits with the
# papers' SGD; MNIST-1D (Greydanus, 2020), hard enough that noise and over-confidence show, for the others. Every
# setting can be overridden by the flags of xent train.
MNIST1D = {"data": "mnist1d", "val_fraction": 0.1, "epochs": 60}
STUDIES: dict[str, Study] = {
    "long-tail": Study(
        "Which loss for a long-tailed training set (imbalance ratio 100)?",
        ("ce", "focal", "cb", "la", "balanced-softmax", "ldam-drw"),
        {
            "data": "digits",
            "imbalance_ratio": 100.0,
            "val_fraction": 0.2,
            "epochs": 60,
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
        },
        "balanced_accuracy",
    ),
    "noisy-labels": Study(
        "Which loss when 40% of the training labels are wrong?",
        ("ce", "ce:label-smoothing=0.1", "gce", "sce", "poly1", "focal"),
        {**MNIST1D, "label_noise": 0.4},
        "accuracy",
    ),
    "calibration": Study(
        "How calibrated is each loss, and how much does temperature scaling fix?",
        ("ce", "ce:label-smoothing=0.1", "focal"),
        MNIST1D,
        "ece",
    ),
    "mse": Study(
        "Why cross-entropy and not mean squared error on the softmax?",
        ("ce", "mse"),
        MNIST1D,
        "accuracy",
    ),
}


@dataclass(frozen=True)
class Cell:
    variant: Variant
    seed: int
    varying: tuple[str, float] | None
    directory: Path

    def config(self, settings: dict[str, Any]) -> TrainConfig:
        values = {**settings, **self.variant.options, "loss": self.variant.loss, "seed": self.seed}
        if self.varying is not None:
            values[self.varying[0]] = self.varying[1]
        return TrainConfig(**{**values, "out": str(self.directory), "quiet": True, "resume": None})


@dataclass
class Grid:
    name: str
    directory: Path
    variants: list[Variant]
    seeds: list[int]
    varying: tuple[str, tuple[float, ...]] | None
    settings: dict[str, Any]
    headline: str
    question: str

    def cells(self) -> list[Cell]:
        values = [None] if self.varying is None else [(self.varying[0], v) for v in self.varying[1]]
        return [
            Cell(variant, seed, value, self.directory / "runs" / _cell_name(variant, seed, value))
            for value in values
            for variant in self.variants
            for seed in self.seeds
        ]

    def to_json(self) -> dict[str, Any]:
        return {"study": self.name, "question": self.question, "headline": self.headline,
                "losses": [v.label for v in self.variants], "seeds": self.seeds,
                "varying": list(self.varying) if self.varying else None, "settings": self.settings}  # fmt: skip


def _cell_name(variant: Variant, seed: int, varying: tuple[str, float] | None) -> str:
    parts = [variant.label] + ([f"{varying[0]}={varying[1]!r}"] if varying else []) + [f"seed{seed}"]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "__".join(parts))


def build_grid(
    directory: Path,
    *,
    study: str = "long-tail",
    losses: Sequence[str] | None = None,
    seeds: int = 3,
    varying: tuple[str, Sequence[float]] | None = None,
    settings: dict[str, Any] | None = None,
) -> Grid:
    """The study's grid with the user's losses, seeds, varying setting and ``xent train`` flags in place of its
    defaults; every cell's configuration is resolved here, so a bad grid fails before any training."""
    if study not in STUDIES:
        raise ConfigError(f"--study {study} unknown; choose from {', '.join(STUDIES)}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    defaults = STUDIES[study]
    variants = [Variant.parse(text) for text in (losses or defaults.losses)]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--losses names a loss twice: {', '.join(labels)}")
    grid_varying = defaults.varying
    if varying is not None:
        name, values = varying
        if name not in VARYING or not values or len(set(values)) != len(values):
            raise ConfigError(f"{VARYING.get(name, name)} needs distinct values, got {list(values)}")
        grid_varying = (name, tuple(float(v) for v in values))
    merged = {**defaults.settings, **(settings or {})}
    if grid_varying is not None:
        merged.pop(grid_varying[0], None)
    grid = Grid(study, directory, variants, list(range(seeds)), grid_varying, merged, defaults.headline,
                defaults.question)  # fmt: skip
    names = [cell.directory.name for cell in grid.cells()]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise ConfigError(f"two cells of the grid would share the run directory {twice}: name each loss once")
    for cell in grid.cells():
        config = resolve(cell.config(grid.settings))
        if config.val_fraction == 0:
            raise ConfigError("xent compare fits temperature scaling on the validation split: --val-fraction > 0")
    return grid


# --- running --------------------------------------------------------------------------------------------------


def cell_finished(cell: Cell) -> bool:
    done = (cell.directory / "summary.json").is_file() and (cell.directory / "calibration.json").is_file()
    return done or (cell.directory / DIVERGED).is_file()


def run_cell(cell: Cell, settings: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Train one cell through the trainer's API (resuming a killed one from its checkpoint), then fit its
    temperature; returns its row of ``results.csv``."""
    import torch
    from rich.console import Console

    from xent.train.checkpoint import LAST
    from xent.train.evaluate import evaluate_run
    from xent.train.loop import TrainingDiverged, train

    if threads is not None:
        torch.set_num_threads(threads)
    if not (cell.directory / "summary.json").is_file():
        config = cell.config(settings)
        if (cell.directory / LAST).is_file():
            for stale in cell.directory.glob(".*.tmp"):  # a checkpoint being written when the cell was killed
                stale.unlink()
            config = dataclasses.replace(config, resume=str(cell.directory), out=None)
        elif cell.directory.exists():  # started but no epoch finished: nothing to keep
            shutil.rmtree(cell.directory)
        try:
            train(config, Console(file=io.StringIO()))
        except TrainingDiverged as error:
            (cell.directory / DIVERGED).write_text(json.dumps({"error": str(error)}) + "\n")
            return read_row(cell)
    if not (cell.directory / "calibration.json").is_file():
        scaled = evaluate_run(cell.directory, temperature_scale=True)
        calibration = {
            key: scaled[key] for key in ("temperature", "nll_before", "nll_after", "ece_before", "ece_after")
        }
        (cell.directory / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    return read_row(cell)


def run_grid(
    grid: Grid, *, jobs: int = 1, on_done: Callable[[Cell, dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Every cell not yet finished, ``jobs`` at a time (one process each when ``jobs > 1``); returns all rows."""
    grid.directory.mkdir(parents=True, exist_ok=True)
    _write_study(grid)
    cells = grid.cells()
    todo = [cell for cell in cells if not cell_finished(cell)]
    for cell in cells:
        if cell not in todo and on_done is not None:
            on_done(cell, read_row(cell))
    if jobs <= 1:
        for cell in todo:
            row = run_cell(cell, grid.settings)
            if on_done is not None:
                on_done(cell, row)
    else:
        # A fresh process per cell; the workers ignore Ctrl-C and the parent terminates them, so an interrupted
        # study stops at once and each killed cell resumes from its last (atomically written) checkpoint.
        threads = max(1, (os.cpu_count() or 1) // jobs)
        pool = get_context("spawn").Pool(jobs, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN),
                                         maxtasksperchild=1)  # fmt: skip
        try:
            tasks = [(index, cell, grid.settings, threads) for index, cell in enumerate(todo)]
            for index, row in pool.imap_unordered(_run_task, tasks):
                if on_done is not None:
                    on_done(todo[index], row)
            pool.close()
        finally:
            pool.terminate()
            pool.join()
    return [read_row(cell) for cell in cells]


def _run_task(task: tuple[int, Cell, dict[str, Any], int]) -> tuple[int, dict[str, Any]]:
    index, cell, settings, threads = task
    return index, run_cell(cell, settings, threads)


def _write_study(grid: Grid) -> None:
    """``study.json``: a study directory resumed with another grid would mix two studies — refused."""
    path = grid.directory / "study.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{path} is unreadable ({error}); choose another --out") from None
        wanted = json.loads(json.dumps(grid.to_json()))
        if saved != wanted:
            differs = sorted(key for key in {*saved, *wanted} if saved.get(key) != wanted.get(key))
            raise ConfigError(
                f"{grid.directory} holds another study (its {', '.join(differs)} differ from these flags'); resume "
                "it with the flags it was started with (see its study.json), or choose another --out"
            )
    else:
        path.write_text(json.dumps(grid.to_json(), indent=2) + "\n")


# --- aggregation ----------------------------------------------------------------------------------------------


def read_row(cell: Cell) -> dict[str, Any]:
    """A finished cell's row of ``results.csv``, read back from its run directory."""
    row: dict[str, Any] = {"loss": cell.variant.label, "seed": cell.seed}
    if cell.varying is not None:
        row[cell.varying[0]] = cell.varying[1]
    if (cell.directory / DIVERGED).is_file():
        keys = ["accuracy", "balanced_accuracy", "macro_f1", "nll", "ece", "ece_after_ts", "nll_after_ts",
                "temperature", "train_seconds"]  # fmt: skip
        return row | dict.fromkeys(keys, math.nan) | {"run_dir": str(cell.directory)}
    summary = json.loads((cell.directory / "summary.json").read_text())
    calibration = json.loads((cell.directory / "calibration.json").read_text())
    row |= {key: summary[f"test_{key}"] for key in ("accuracy", "balanced_accuracy", "macro_f1", "nll", "ece")}
    row |= {"ece_after_ts": calibration["ece_after"], "nll_after_ts": calibration["nll_after"],
            "temperature": calibration["temperature"], "train_seconds": summary["train_seconds"],
            "run_dir": str(cell.directory)}  # fmt: skip
    return row


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if any(math.isnan(value) for value in values):  # a diverged seed: no mean to speak of
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def baseline_loss(rows: Sequence[dict[str, Any]]) -> str:
    """What every loss is compared with: cross-entropy when the grid has it, else its first loss."""
    losses = [row["loss"] for row in rows]
    return "ce" if "ce" in losses else losses[0]


def aggregate(rows: Sequence[dict[str, Any]], varying: str | None) -> list[dict[str, Any]]:
    """Per loss (and varying value): the mean and sample standard deviation over seeds of every metric, and the
    *paired* gap to the baseline (:func:`baseline_loss`) — the mean and standard deviation over seeds of
    ``metric(loss, seed) − metric(baseline, seed)``. A seed fixes the data (the validation split, the long-tailed
    subset, the flipped labels) for every loss, so the paired spread measures the losses' difference, not how hard
    each seed's data happens to be."""
    groups: dict[tuple[Any, Any], dict[int, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["loss"], row.get(varying) if varying else None), {})[int(row["seed"])] = row
    baseline = baseline_loss(rows) if rows else None
    summary = []
    for (loss, value), members in groups.items():
        entry: dict[str, Any] = {"loss": loss, **({varying: value} if varying else {}), "seeds": len(members)}
        reference = groups.get((baseline, value), {})
        for key in [m[0] for m in METRICS] + ["nll_after_ts"]:
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std([float(m[key]) for m in members.values()])
            paired = [float(members[s][key]) - float(reference[s][key]) for s in sorted(members) if s in reference]
            entry[f"{key}_gap_mean"], entry[f"{key}_gap_std"] = _mean_std(paired) if paired else (math.nan, math.nan)
        summary.append(entry)
    return summary


def write_csv(rows: Sequence[dict[str, Any]], path: Path, study: str) -> None:
    columns = ["study", *dict.fromkeys(key for row in rows for key in row)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({"study": study, **row})


def best(summary: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The entry with the best mean; a diverged loss (NaN) never wins."""
    higher = next(m[2] for m in METRICS if m[0] == metric)
    finite = [entry for entry in summary if math.isfinite(entry[f"{metric}_mean"])] or list(summary)
    return (max if higher else min)(finite, key=lambda entry: entry[f"{metric}_mean"])


def gap(entry: dict[str, Any], metric: str) -> tuple[float, float]:
    """The entry's paired gap to the baseline in ``metric``: mean and standard deviation over seeds."""
    return entry[f"{metric}_gap_mean"], entry[f"{metric}_gap_std"]
