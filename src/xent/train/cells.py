"""Training a study's cells in its directory: ``runs/CELL/`` (a run directory of ``xent train`` each, plus
``calibration.json``: test NLL and ECE before and after temperature scaling fitted on the validation split) and
``study.json`` (the grid). A cell's row of ``results.csv`` is read back from its run directory, so an interrupted
study resumes where it stopped: finished cells are kept, a cell killed mid-run continues from its last checkpoint, and
a cell whose ``summary.json`` or ``calibration.json`` is damaged (or copied from another cell) is run again.

One process at a time uses a study directory: it holds an exclusive lock on ``study.lock`` (``flock``, released by the
kernel when the process ends, even by ``kill -9``), and its training processes die with it. Every file the study
writes goes through a temporary file of its own, renamed into place, and only when its content changed: a rerun of a
finished study reads and does not write.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from xent.train.checkpoint import write_atomic
from xent.train.config import ConfigError
from xent.train.study import Cell, Grid

DIVERGED = "diverged.json"  # a cell whose loss became NaN or infinite: a result (NaN metrics), not a crash
LOCK = "study.lock"
# What read_row and the plots read of a run's summary.json and of calibration.json
SUMMARY_NUMBERS = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_nll", "test_ece", "train_seconds")
SUMMARY_KEYS = (*SUMMARY_NUMBERS, "run_dir", "class_counts", "test_per_class_accuracy", "test_reliability")
CALIBRATION_NUMBERS = ("temperature", "nll_before", "nll_after", "ece_before", "ece_after")


# --- the study directory: one process, files written whole ---------------------------------------------------


class StudyInUse(ConfigError):
    """Another process holds the study directory's lock."""


_HELD: set[Path] = set()  # the study directories this process has locked (the lock is taken once per process)


@contextmanager
def lock_study(directory: Path) -> Iterator[None]:
    """Hold the study directory for this process: an exclusive ``flock`` on ``study.lock``, which names the holder
    (pid, host, start, command) so that a second process is refused in one line that says who holds it. The kernel
    releases the lock when the process ends, however it ends: a ``kill -9`` leaves no stale lock. In a read-only
    study the lock is taken without naming the holder; where not even the lock file can be opened, nothing can be
    written by this process either, and it goes on unlocked."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    if key in _HELD:
        yield
        return
    path = directory / LOCK
    writable = True
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        writable = False
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            yield
            return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(descriptor)
        raise StudyInUse(
            f"study directory {directory} is in use by {holder}; wait for it to finish or stop it"
        ) from None
    try:
        if writable:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, (_holder() + "\n").encode(), 0)
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        os.close(descriptor)  # releases the lock


def _holder() -> str:
    command = " ".join(["xent", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("xent", "__main__.py") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"xent compare (pid {os.getpid()} on {socket.gethostname()}, started {started}{': ' if command else ''}"
        f"{command})"
    )


def write_if_changed(path: Path, data: bytes) -> bool:
    """:func:`write_atomic` where ``path`` does not already hold ``data``; returns whether it wrote."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    write_atomic(path, data)
    return True


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


# --- running --------------------------------------------------------------------------------------------------


def damage(cell: Cell) -> tuple[Path, str] | None:
    """Which file of a cell that looks finished cannot be its result, and why (a sentence naming it), or None.
    ``summary.json`` must be the trainer's, with every number the study reads, and its ``run_dir`` must be this
    cell's directory by name — a study directory moved elsewhere keeps its cells, a file copied from another cell
    is not this cell's result."""
    if (cell.directory / DIVERGED).is_file() or not (cell.directory / "summary.json").is_file():
        return None
    path = cell.directory / "summary.json"
    summary, problem = _read_json(path, SUMMARY_KEYS, SUMMARY_NUMBERS)
    if problem:
        return path, problem
    run_dir = str(summary["run_dir"])
    if Path(run_dir).name != cell.directory.name:
        return path, f"{path} is the summary of {run_dir} (its run_dir), not of this cell"
    calibration = cell.directory / "calibration.json"
    if calibration.is_file():
        problem = _read_json(calibration, CALIBRATION_NUMBERS, CALIBRATION_NUMBERS)[1]
        return (calibration, problem) if problem else None
    return None


def _read_json(path: Path, keys: Sequence[str], numbers: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    try:
        value = json.loads(path.read_text())
    except UnicodeDecodeError:
        return {}, f"{path} is damaged (not text)"
    except json.JSONDecodeError as error:
        return {}, f"{path} is damaged (not JSON: {error.msg}, line {error.lineno} column {error.colno})"
    if not isinstance(value, dict):
        return {}, f"{path} is damaged (not a JSON object)"
    missing = [key for key in keys if key not in value]
    if missing:
        return {}, f"{path} is damaged (no {', '.join(missing)})"
    wrong = [key for key in numbers if isinstance(value[key], bool) or not isinstance(value[key], (int, float))]
    if wrong:
        return {}, f"{path} is damaged ({', '.join(wrong)} not a number)"
    return value, None


def cell_finished(cell: Cell) -> bool:
    done = (cell.directory / "summary.json").is_file() and (cell.directory / "calibration.json").is_file()
    return (done and damage(cell) is None) or (cell.directory / DIVERGED).is_file()


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
            for stale in cell.directory.glob(".*.tmp"):  # left by a writer killed mid-write (one study at a time)
                stale.unlink()
            config = dataclasses.replace(config, resume=str(cell.directory), out=None)
        elif cell.directory.exists():  # started but no epoch finished: nothing to keep
            shutil.rmtree(cell.directory)
        try:
            train(config, Console(file=io.StringIO()))
        except TrainingDiverged as error:
            write_atomic(cell.directory / DIVERGED, _json_bytes({"error": str(error)}))
            return read_row(cell)
    calibration = cell.directory / "calibration.json"
    if not calibration.is_file():
        scaled = evaluate_run(cell.directory, temperature_scale=True)
        if not calibration.is_file():  # an evaluate_run that does not save what it fitted
            write_atomic(calibration, _json_bytes({key: scaled[key] for key in CALIBRATION_NUMBERS}))
    return read_row(cell)


def _warn(message: str) -> None:
    print(f"xent compare: {message}", file=sys.stderr)


def run_grid(
    grid: Grid,
    *,
    jobs: int = 1,
    on_done: Callable[[Cell, dict[str, Any]], None] | None = None,
    warn: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Every cell not yet finished, ``jobs`` at a time (``jobs`` worker processes when ``jobs > 1``, each training
    one cell after another); returns all rows.

    The study directory is locked for the call (:func:`lock_study`). A finished cell whose files are damaged or
    another cell's is run again, after a one-line ``warn`` naming the file (by default on stderr). ``on_done`` hears
    of every cell, the finished ones first; ``on_start`` then of the number of cells to train, before the first
    starts."""
    warn = warn or _warn
    with lock_study(grid.directory):
        _save_grid(grid)
        cells = grid.cells()
        for cell in cells:
            damaged = damage(cell)
            if damaged is not None:
                path, problem = damaged
                again = (
                    "its temperature is fitted again"
                    if path.name == "calibration.json"
                    else "the cell is run again (from its last checkpoint)"
                )
                warn(f"{problem}; removed, {again}")
                path.unlink()
        todo = [cell for cell in cells if not cell_finished(cell)]
        for cell in cells:
            if cell not in todo and on_done is not None:
                on_done(cell, read_row(cell))
        if on_start is not None:
            on_start(len(todo))
        if jobs <= 1:
            for cell in todo:
                row = run_cell(cell, grid.settings)
                if on_done is not None:
                    on_done(cell, row)
        else:
            _run_in_processes(todo, grid.settings, jobs, on_done)
        return [read_row(cell) for cell in cells]


def _run_in_processes(
    todo: list[Cell], settings: dict[str, Any], jobs: int, on_done: Callable[[Cell, dict[str, Any]], None] | None
) -> None:
    # `jobs` workers, each training cell after cell: a process starts once per worker, not once per cell (importing
    # torch and the trainer took longer than training a cell of the default study). A cell is as isolated in a
    # reused worker as in a fresh one: the trainer seeds every random state from the cell's configuration, each
    # cell sets its threads, a run releases its directory's lock however it ends, and the data sets a worker keeps
    # are handed out as copies (test_compare checks that --jobs 2 gives --jobs 1's numbers). The workers ignore
    # Ctrl-C and the parent terminates them, so an interrupted study stops at once and each killed cell resumes
    # from its last (atomically written) checkpoint. A parent killed outright (kill -9) takes its workers with it
    # (_start_worker): none trains on beside a rerun.
    if not todo:
        return
    # threads from the jobs asked for, not the workers started: the last cells of a resumed study train as the first
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = get_context("spawn").Pool(min(jobs, len(todo)), initializer=_start_worker, initargs=(os.getpid(),))
    try:
        tasks = [(index, cell, settings, threads) for index, cell in enumerate(todo)]
        for index, row in pool.imap_unordered(_run_task, tasks):
            if on_done is not None:
                on_done(todo[index], row)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _start_worker(parent: int) -> None:
    """A worker ignores Ctrl-C (its parent stops it) and dies with its parent: a thread of its own sees the parent
    gone (the worker is handed to another process) within a fraction of a second and kills the worker at once.
    Not ``prctl(PR_SET_PDEATHSIG)``: it fires when the *thread* that started the worker ends, and the pool starts
    replacement workers from a thread that ends before the pool does — killing idle workers that hold the pool's
    queue lock, after which the pool never finishes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), name="xent-watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:  # also true at once if the parent died before this thread started
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: nothing of this worker's may outlive its study's lock


def _run_task(task: tuple[int, Cell, dict[str, Any], int]) -> tuple[int, dict[str, Any]]:
    index, cell, settings, threads = task
    return index, run_cell(cell, settings, threads)


def _save_grid(grid: Grid) -> None:
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
        write_atomic(path, _json_bytes(grid.to_json()))
