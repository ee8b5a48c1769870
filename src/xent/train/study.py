"""What a loss study is: the studies ``xent compare`` knows, the losses of a grid (``NAME[:FLAG=VALUE...]``), and the
grid itself — losses × seeds (× the values of one varying setting), one cell and one run directory each — with every
cell's configuration checked before any training.

Training the cells is :mod:`xent.train.cells`; a study from the grid to its report is :func:`xent.train.run_study`.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xent.train.config import ConfigError, TrainConfig, resolve
from xent.train.losses import LOSSES

VARYING = {"imbalance_ratio": "--imbalance-ratios", "label_noise": "--label-noises"}


@dataclass(frozen=True)
class Variant:
    """A loss of a study's grid: a loss of ``xent train --loss`` and the flags that set it apart, written
    ``NAME[:FLAG=VALUE...]`` (``ce:label-smoothing=0.1`` is cross-entropy with label smoothing).

    Attributes:
        label: the one spelling of the variant (``ce:label-smoothing=0.1``), its name in every table.
        loss: the trainer's loss (``ce``).
        options: the :class:`~xent.train.TrainConfig` fields the variant sets (``{"label_smoothing": 0.1}``).
    """

    label: str
    loss: str
    options: dict[str, float]

    @classmethod
    def parse(cls, text: str) -> Variant:
        """The variant written ``text``; a :exc:`~xent.train.ConfigError` names an unknown loss or flag."""
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
    """A study ``xent compare --study`` knows: the question it answers, its losses and the settings it trains with."""

    question: str
    losses: tuple[str, ...]
    settings: dict[str, Any]  # TrainConfig fields the study sets (a user's flag overrides them)
    headline: str  # the metric the question is about
    varying: tuple[str, tuple[float, ...]] | None = None


# Defaults that finish in under a minute each on 2 idle CPU cores (two runs at a time: 21, 41, 24 and 17 s,
# benchmarks/doc_times.py) and show the published effects beyond one standard deviation over 3 seeds (measured, see
# README "Choosing a loss"): long-tailed digits with the papers' SGD; MNIST-1D (Greydanus, 2020), hard enough that
# noise and over-confidence show, for the others. Every setting can be overridden by the flags of xent train.
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
    """One run of a grid: a loss variant with one seed (and one value of the varying setting), trained in
    ``directory``, a run directory of ``xent train``.

    Attributes:
        variant: the cell's loss.
        seed: the cell's seed, which fixes its data (split, long-tailed subset, flipped labels) for every loss.
        varying: ``(setting, value)`` of a grid over a setting, else None.
        directory: the cell's run directory, ``STUDY/runs/NAME``.
    """

    variant: Variant
    seed: int
    varying: tuple[str, float] | None
    directory: Path

    def config(self, settings: dict[str, Any]) -> TrainConfig:
        """The cell's configuration: the grid's shared ``settings`` with the cell's loss, seed and varying value."""
        values = {**settings, **self.variant.options, "loss": self.variant.loss, "seed": self.seed}
        if self.varying is not None:
            values[self.varying[0]] = self.varying[1]
        return TrainConfig(**{**values, "out": str(self.directory), "quiet": True, "resume": None})


@dataclass
class Grid:
    """A study's grid, built and checked by ``xent compare`` (and :func:`xent.train.run_study`) before any training.

    Attributes:
        name: the study (``long-tail``).
        directory: the study directory.
        variants: the losses, in the order of the tables.
        seeds: the seeds, ``0`` to ``seeds - 1``.
        varying: ``(setting, values)`` of a grid over ``imbalance_ratio`` or ``label_noise``, else None.
        settings: the :class:`~xent.train.TrainConfig` fields every cell shares.
        headline: the metric the study's question is about (a column of ``results.csv``).
        question: the study's question, the report's title.
    """

    name: str
    directory: Path
    variants: list[Variant]
    seeds: list[int]
    varying: tuple[str, tuple[float, ...]] | None
    settings: dict[str, Any]
    headline: str
    question: str

    def cells(self) -> list[Cell]:
        """Every cell, varying value by value, then loss by loss, then seed by seed."""
        values = [None] if self.varying is None else [(self.varying[0], v) for v in self.varying[1]]
        return [
            Cell(variant, seed, value, self.directory / "runs" / _cell_name(variant, seed, value))
            for value in values
            for variant in self.variants
            for seed in self.seeds
        ]

    def to_json(self) -> dict[str, Any]:
        """The grid as ``study.json`` saves it: a study directory resumed with another grid is refused."""
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
