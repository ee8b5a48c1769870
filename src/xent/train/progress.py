"""Progress for the console: the time left of a training run (epochs) and of a study (cells), and a study's bar.

Both estimates come from what this process has done so far, not from the whole run's history: a resumed run or study
starts its estimate afresh, and the cells a study finds finished (read, not trained) do not count as fast work.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import ProgressColumn, Task, TaskID
    from rich.text import Text

    from xent.train.study import Cell, Grid


def clock(seconds: float) -> str:
    """``2:05`` (m:ss) under an hour, ``1:02:05`` (h:mm:ss) from an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def time_left(elapsed: float, done: float, total: float) -> float | None:
    """Seconds left at the pace so far: ``elapsed`` seconds did ``done`` of ``total`` units; None before any."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(total - done, 0.0) * elapsed / done


class RunClock:
    """The run's ETA from the epochs this process has trained (a fraction of the current one counts)."""

    def __init__(self, completed_epochs: int, epochs: int) -> None:
        self.started = time.perf_counter()
        self.first, self.epochs = completed_epochs, epochs

    def eta(self, completed_epochs: int, fraction: float = 0.0) -> str:
        """``"run ETA 1:23"``, or ``""`` before anything was trained or when one epoch is all there is."""
        if self.epochs - self.first <= 1:
            return ""  # the epoch's own bar says it
        done = completed_epochs + fraction - self.first
        left = time_left(time.perf_counter() - self.started, done, self.epochs - self.first)
        return "" if left is None else f"run ETA {clock(left)}"


def cells_eta_column() -> ProgressColumn:
    """A rich progress column: the study's time left, from the cells trained in this process since the task's field
    ``started`` (a ``time.monotonic()``, set when training starts) and its ``to_train`` and ``trained`` counts."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class CellsTimeLeft(ProgressColumn):
        def render(self, task: Task) -> Text:
            started, trained = task.fields.get("started"), task.fields.get("trained", 0)
            left = None if started is None else time_left(time.monotonic() - started, trained,
                                                          task.fields.get("to_train", 0))  # fmt: skip
            if started is not None and task.fields.get("to_train", 0) == trained:
                left = 0.0
            return Text(f"ETA {'-:--' if left is None else clock(left)}", style="progress.remaining")

    return CellsTimeLeft()


class StudyProgress:
    """``xent compare``'s console while a study runs: a line that announces the grid, a bar of its cells with the
    time left, and a line per cell with its results. Its methods are :func:`xent.train.run_study`'s ``on_begin``,
    ``on_start`` and ``on_done``; as a context manager it clears the bar when the study ends, however it ends."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             cells_eta_column(), console=console, transient=True)  # fmt: skip
        self._task: TaskID | None = None
        self._shown = False

    def begin(self, grid: Grid) -> None:
        """Announce the grid and show the bar."""
        cells = len(grid.cells())
        self.console.print(f"xent compare {grid.name}: {len(grid.variants)} losses × {len(grid.seeds)} seeds"
                           + (f" × {len(grid.varying[1])} values of {grid.varying[0]}" if grid.varying else "")
                           + f" = {cells} runs in {grid.directory}")  # fmt: skip
        self._bar.start()
        self._shown = True
        self._task = self._bar.add_task("cells", total=cells, started=None, to_train=0, trained=0)

    def start(self, to_train: int) -> None:
        """The ETA counts the cells trained from here on."""
        if self._task is not None:
            self._bar.update(self._task, started=time.monotonic(), to_train=to_train)

    def done(self, cell: Cell, row: dict[str, Any]) -> None:
        """One line for the cell; the bar goes with the last cell, before the study draws its report."""
        if self._task is None:
            return
        fields = self._bar.tasks[self._task].fields
        if fields["started"] is not None:
            self._bar.update(self._task, trained=fields["trained"] + 1)
        self._bar.advance(self._task)
        self.console.print(f"  {cell.directory.name}: accuracy {100 * row['accuracy']:.2f}%, balanced "
                           f"{100 * row['balanced_accuracy']:.2f}%, ECE {row['ece']:.3f}")  # fmt: skip
        if self._bar.tasks[self._task].finished:
            self._clear()

    def _clear(self) -> None:
        if self._shown:
            self._shown = False
            self._bar.stop()

    def __enter__(self) -> StudyProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._clear()
