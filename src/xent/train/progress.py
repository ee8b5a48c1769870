"""Time left, for the console: of a training run (epochs) and of a study (cells).

Both estimate from what this process has done so far, not from the whole run's history: a resumed run or study
starts its estimate afresh, and the cells a study finds finished (read, not trained) do not count as fast work.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import ProgressColumn, Task
    from rich.text import Text


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
