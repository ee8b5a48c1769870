"""``xent compare`` as a Python API: :func:`run_study` runs a loss study — a grid of losses × seeds (× imbalance
ratios or noise rates) trained with the trainer's own API, one run directory per cell — and writes its report;
:class:`StudyResult` is what it returns.

A study directory holds ``study.json`` (the grid), ``runs/CELL/`` (a run directory of ``xent train`` each, plus
``calibration.json``), ``results.csv`` (one row per cell), ``summary.csv`` (mean and standard deviation over seeds),
``plots/`` and ``report.html``/``report.md``. Everything after training is recomputed from the run directories, so
an interrupted study resumes where it stopped (:mod:`xent.train.cells`).

The parts, in the order a study runs them: :mod:`xent.train.study` (the grid and its checks),
:mod:`xent.train.cells` (the study directory and the training of its cells), :mod:`xent.train.aggregate` (rows to
summary), :mod:`xent.train.findings` (the sentences) and :mod:`xent.train.report` (table, plots, written reports).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xent.train.aggregate import aggregate
from xent.train.cells import lock_study, run_grid
from xent.train.config import ConfigError
from xent.train.findings import findings as study_findings
from xent.train.report import write_study
from xent.train.study import Cell, Grid, build_grid


@dataclass(frozen=True)
class StudyResult:
    """A finished study, as :func:`run_study` leaves it: what ``xent compare`` prints and writes.

    Attributes:
        grid: the study's grid — its name, question, headline metric, losses, seeds and cells.
        rows: one per cell, the rows of ``results.csv`` (without its ``study`` column): ``loss``, ``seed``, the
            varying setting if any, the test metrics (``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``nll``,
            ``ece``), ``ece_after_ts``, ``nll_after_ts``, ``temperature``, ``train_seconds`` and ``run_dir``. A cell
            that diverged has NaN metrics.
        summary: one per loss (and varying value), the rows of ``summary.csv``: ``seeds`` and, for each metric,
            ``METRIC_mean`` and ``METRIC_std`` over seeds and ``METRIC_gap_mean``/``METRIC_gap_std``, the paired gap
            to cross-entropy (or the first loss).
        findings: what the study shows, in sentences, the recommendation last — as its reports list them.
        files: the study's outputs that hold this result, each written now or found up to date: ``results.csv``,
            ``summary.csv``, the plots, ``report.md`` and ``report.html``.
        unwritten: for each output that could not be written (a read-only study directory, say), its error, which
            names the file; the result above is still the study's.
    """

    grid: Grid
    rows: tuple[dict[str, Any], ...]
    summary: tuple[dict[str, Any], ...]
    findings: tuple[str, ...]
    files: tuple[Path, ...]
    unwritten: tuple[OSError, ...]

    @property
    def directory(self) -> Path:
        """The study directory."""
        return self.grid.directory

    @property
    def report(self) -> Path:
        """The study's report, ``report.html`` (one file, plots embedded)."""
        return self.grid.directory / "report.html"


def run_study(
    study: str = "long-tail",
    *,
    out: str | Path,
    losses: Sequence[str] | None = None,
    seeds: int = 3,
    varying: tuple[str, Sequence[float]] | None = None,
    settings: Mapping[str, Any] | None = None,
    jobs: int = 1,
    on_begin: Callable[[Grid], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_done: Callable[[Cell, dict[str, Any]], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run a loss study, as ``xent compare`` does: train every cell not yet finished, then write the study's tables,
    plots and reports, and return its rows, summary and findings.

    The grid is checked whole before any training (an unknown loss, a flag a loss does not read, a bad setting). The
    study directory is held by this process for the call: a second process on it is refused. A study directory that
    exists is resumed — finished cells are read, a cell interrupted mid-run continues from its last checkpoint, a
    cell whose results are damaged is run again after a ``warn`` — and one that holds another grid is refused. A rerun
    of a finished study reads and does not write.

    Args:
        study: a study of ``xent compare --study``: ``"long-tail"``, ``"noisy-labels"``, ``"calibration"`` or
            ``"mse"``; it sets the losses, the settings and the headline metric, each of which the arguments below
            can replace.
        out: the study directory, created if missing.
        losses: the losses, each ``NAME`` or ``NAME:FLAG=VALUE`` (``["ce", "focal:gamma=1"]``); None: the study's.
        seeds: seeds per loss, ``0`` to ``seeds - 1``.
        varying: a grid over one setting, ``("imbalance_ratio", [10, 100])`` or ``("label_noise", [0.2, 0.4])``.
        settings: :class:`~xent.train.TrainConfig` fields every run shares (``{"epochs": 20, "data": "mnist1d"}``),
            over the study's; a cell's loss, seed, run directory and resumption are the study's own.
        jobs: runs trained at once, by as many worker processes, each training one cell after another with
            cores/``jobs`` threads; 1 trains every cell in this process. Numbers do not depend on it.
        on_begin: hears of the grid once it is built and the study directory is held, before any cell is read.
        on_start: hears of the number of cells to train, after the finished ones were reported to ``on_done``.
        on_done: hears of every cell with its row of ``results.csv``, the finished ones first.
        warn: takes the one-line warnings (a damaged file removed, its cell run again); None prints them to stderr.

    Returns:
        The study's :class:`StudyResult`. Outputs that could not be written are in its ``unwritten``, not raised.

    Raises:
        ConfigError: a bad grid or setting (the message names the flag of ``xent compare``), ``jobs`` below 1 or a
            ``settings["workers"]`` with ``jobs`` above 1, a study directory in use by another process or holding
            another study.
        TypeError: ``out`` is not a path or ``losses`` is one string instead of a sequence of names.
        OSError: the study's runs cannot be written.
        Interrupted: Ctrl-C while a cell trained in this process (``KeyboardInterrupt`` otherwise); run the same
            study again to continue: finished cells are kept.

    Example::

        from xent.train import run_study

        result = run_study("long-tail", out="runs/long-tail", losses=["ce", "la"], seeds=3)
        print(*result.findings, sep="\\n")  # the recommendation last; result.report is report.html
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    workers = (settings or {}).get("workers", 0)
    if jobs > 1 and workers > 0:
        raise ConfigError(f"--workers {workers} starts loader processes, which a --jobs worker process cannot: "
                          "use --jobs 1 with --workers, or leave --workers at 0")  # fmt: skip
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path (str or os.PathLike), got {type(out).__name__}")
    if isinstance(losses, str):
        raise TypeError(f"losses must be a sequence of names, e.g. {losses.split(',')!r}, got the string {losses!r}")
    grid = build_grid(Path(out), study=study, losses=losses, seeds=seeds, varying=varying,
                      settings=dict(settings or {}))  # fmt: skip
    with lock_study(grid.directory):  # one process per study directory: a second is refused, naming the first
        if on_begin is not None:
            on_begin(grid)
        rows = run_grid(grid, jobs=jobs, on_done=on_done, on_start=on_start, warn=warn)
        summary = aggregate(rows, grid.varying[0] if grid.varying else None)
        sentences = study_findings(grid, summary, rows)
        files, unwritten = write_study(grid, rows, summary, sentences)
    return StudyResult(grid, tuple(rows), tuple(summary), tuple(sentences), tuple(files), tuple(unwritten))
