"""The run's pictures: loss and accuracy curves, the confusion matrix and the reliability diagram.

matplotlib is imported when the first picture is drawn, after training: ``xent train`` starts without it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def require() -> None:
    """Stop before training, not after it, when matplotlib is missing: it is imported only to draw, at the end."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")


def figure(**options: Any) -> Figure:
    """A new figure laid out tight when drawn, drawn by Agg: no pyplot (its import, global state and open-figure list
    cost ~0.3 s per run and are not needed to write files), one draw per figure (``tight_layout()`` + ``savefig``
    drew twice)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    new = Figure(layout="tight", **options)
    FigureCanvasAgg(new)
    return new


def png(drawn: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    drawn.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    drawn = figure(figsize=(10, 4))
    loss_axis, accuracy_axis = drawn.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test")):
        values = [row.get(key) for row in history]
        if all(v is not None for v in values):
            loss_axis.plot(epochs, values, label=label)
    for key, label in (("val_accuracy", "validation"), ("test_accuracy", "test"),
                       ("test_balanced_accuracy", "test, balanced")):  # fmt: skip
        values = [row.get(key) for row in history]
        if all(v is not None for v in values):
            accuracy_axis.plot(epochs, values, label=label)
    loss_axis.set(xlabel="epoch", ylabel="loss (mean over examples)", title="Loss")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    save(drawn, path)


def confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path) -> None:
    counts = np.asarray(matrix)
    size = max(4.0, 0.5 * len(class_names) + 2)
    drawn = figure(figsize=(size, size))
    axis = drawn.subplots()
    axis.imshow(counts, cmap="Blues")
    ticks = range(len(class_names))
    axis.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    axis.set_xticklabels(class_names, rotation=45, ha="right")
    axis.set_yticklabels(class_names)
    threshold = counts.max() / 2 if counts.size else 0
    for (row, column), value in np.ndenumerate(counts):
        axis.text(column, row, str(value), ha="center", va="center", fontsize=8,
                  color="white" if value > threshold else "black")  # fmt: skip
    save(drawn, path)


def reliability_diagram(bins: Sequence[Sequence[float]], ece: float, path: Path) -> None:
    """``bins``: per confidence bin, (count, Σ confidence, Σ correct)."""
    counts, confidence, correct = (np.asarray(column, dtype=float) for column in zip(*bins, strict=True))
    edges = np.linspace(0, 1, len(counts) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts > 0, correct / counts, 0.0)
        mean_confidence = np.where(counts > 0, confidence / counts, 0.0)  # empty bins draw nothing
    drawn = figure(figsize=(5, 5))
    axis = drawn.subplots()
    width = edges[1] - edges[0]
    axis.bar(centers, accuracy, width=width, edgecolor="black", label="accuracy")
    axis.bar(centers, mean_confidence - accuracy, bottom=accuracy, width=width, color="red", alpha=0.3, label="gap")
    axis.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    axis.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
             title=f"Reliability (test), ECE = {ece:.3f}")  # fmt: skip
    axis.legend(loc="upper left")
    save(drawn, path)


def save(drawn: Figure, path: Path, dpi: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn.savefig(path, dpi=dpi)
