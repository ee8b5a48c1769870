"""What ``xent compare`` shows of a study: the terminal table, the plots, and ``report.md``/``report.html``, which say
in words (:mod:`xent.train.findings`) what won, by how much and with what uncertainty, and link every run. Every file
is written only where its content changed: a rerun of a finished study reads and does not write."""

from __future__ import annotations

import base64
import csv
import html
import json
import statistics
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from xent.train.aggregate import METRICS, UNRANKED, best, mean_std_text, row_label, write_csv
from xent.train.cells import write_if_changed
from xent.train.plots import figure as new_figure
from xent.train.plots import png

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.table import Table

    from xent.train.study import Grid

PLOTS = ("metrics.png", "per_class.png", "reliability.png", "curves.png")


def _marked_cells(
    summary: Sequence[dict[str, Any]], entry: dict[str, Any], varying: str | None, mark: str
) -> list[str]:
    """The entry's metric cells, each best of its column (among the entries of the same varying value) written
    through ``mark`` (a format string with ``{}``); training time is shown, not crowned."""
    peers = [e for e in summary if not varying or e[varying] == entry[varying]]
    return [
        mark.format(mean_std_text(entry, key, percent))
        if key not in UNRANKED and best(peers, key) is entry
        else mean_std_text(entry, key, percent)
        for key, _, _, percent in METRICS
    ]


def table(grid: Grid, summary: Sequence[dict[str, Any]]) -> Table:
    """A rich table: mean ± std over seeds, the best of each column (within each varying value) in bold with ★
    (training time is not a column to win)."""
    from rich.table import Table

    varying = grid.varying[0] if grid.varying else None
    seeds = f"{len(grid.seeds)} seed{'s' if len(grid.seeds) > 1 else ''}"
    result = Table(title=f"xent compare — {grid.name}: {grid.question} ({seeds}, mean ± std)")
    result.add_column("loss")
    for _, heading, higher, _ in METRICS:
        result.add_column(f"{heading} {'↑' if higher else '↓'}", justify="right")
    for entry in summary:
        result.add_row(row_label(entry, varying), *_marked_cells(summary, entry, varying, "[bold]{} ★[/bold]"))
    return result


# --- plots ------------------------------------------------------------------------------------------------------


def _runs(rows: Sequence[dict[str, Any]], varying: str | None) -> dict[str, list[Path]]:
    """The run directories of each loss (and varying value) that trained to the end, by label."""
    runs: dict[str, list[Path]] = {}
    for row in rows:
        if (Path(row["run_dir"]) / "summary.json").is_file():
            runs.setdefault(row_label(row, varying), []).append(Path(row["run_dir"]))
    return runs


MARKERS = "osD^vP*Xh<>p"
LINESTYLES = ("-", "--", "-.", ":")


def plot_metrics(summary: Sequence[dict[str, Any]], varying: str | None, path: Path) -> None:
    """Mean ± std over seeds of each metric, one point per loss; each axis spans the values (not 0 to them): the
    differences between the losses are what the study is about."""
    shown = [m for m in METRICS if m[0] not in UNRANKED]
    figure = new_figure(figsize=(3.2 * len(shown), 3.6))
    axes = figure.subplots(1, len(shown))
    labels = [row_label(entry, varying) for entry in summary]
    positions = list(range(len(summary)))
    for axis, (key, heading, higher, _) in zip(axes, shown, strict=True):
        means = [entry[f"{key}_mean"] for entry in summary]
        stds = [entry[f"{key}_std"] for entry in summary]
        axis.errorbar(positions, means, yerr=stds, fmt="o", capsize=4, color="tab:blue")
        axis.margins(x=0.15, y=0.15)
        axis.set_xticks(positions)
        axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        axis.set_title(f"{heading} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    _save(figure, path)


def plot_per_class(rows: Sequence[dict[str, Any]], varying: str | None, path: Path) -> None:
    """Test accuracy against the training-set frequency of the class (log axis): the long-tail picture. Classes with
    the same training count are one point (their mean over classes and seeds), so a line never doubles back; each
    loss has its marker and line style and sits a few percent apart along the axis, so identical results (balanced
    softmax and logit adjustment at τ = 1) show as two lines, not one."""
    figure = new_figure(figsize=(6.5, 4.5))
    axis = figure.subplots()
    runs = _runs(rows, varying)
    for index, (loss, directories) in enumerate(runs.items()):
        by_count: dict[float, list[float]] = {}
        for directory in directories:
            summary = json.loads((directory / "summary.json").read_text())
            for count, accuracy in zip(summary["class_counts"], summary["test_per_class_accuracy"].values(),
                                       strict=True):  # fmt: skip
                if accuracy is not None:  # a class without test examples has no accuracy
                    by_count.setdefault(float(count), []).append(float(accuracy))
        counts = sorted(by_count)
        shift = 1.05 ** (index - (len(runs) - 1) / 2)
        axis.plot([count * shift for count in counts], [statistics.fmean(by_count[c]) for c in counts],
                  marker=MARKERS[index % len(MARKERS)], linestyle=LINESTYLES[index % len(LINESTYLES)],
                  markersize=5, alpha=0.85, label=loss)  # fmt: skip
    title = "Per-class accuracy against class frequency\n(mean over seeds, classes of equal count pooled)"
    axis.set(xscale="log", xlabel="training examples of the class (log; losses drawn slightly apart)",
             ylabel="test accuracy of the class", ylim=(-0.02, 1.02), title=title)  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(figure, path)


def plot_reliability(rows: Sequence[dict[str, Any]], varying: str | None, path: Path) -> None:
    """One reliability diagram per loss (and varying value), the bins of its seeds pooled."""
    runs = _runs(rows, varying)
    figure = new_figure(figsize=(3.2 * len(runs), 3.4))
    axes = figure.subplots(1, len(runs), squeeze=False)
    for axis, (loss, directories) in zip(axes[0], runs.items(), strict=True):
        # an array: every loss has at least one run
        bins = cast(
            npt.NDArray[Any],
            sum(np.asarray(json.loads((d / "summary.json").read_text())["test_reliability"]) for d in directories),
        )
        counts, confidence, correct = bins[:, 0], bins[:, 1], bins[:, 2]
        edges = np.linspace(0, 1, len(counts) + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(counts > 0, correct / counts, 0.0)
            mean_confidence = np.where(counts > 0, confidence / counts, 0.0)
        ece = float(np.abs(correct - confidence).sum() / max(counts.sum(), 1))
        centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        axis.bar(centers, accuracy, width=width, edgecolor="black")
        axis.bar(centers, mean_confidence - accuracy, bottom=accuracy, width=width, color="red", alpha=0.3)
        axis.plot([0, 1], [0, 1], "k--")
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{loss}\nECE {ece:.3f}")
        axis.title.set_fontsize(9)
    axes[0][0].set_ylabel("accuracy")
    _save(figure, path)


def plot_curves(rows: Sequence[dict[str, Any]], varying: str | None, headline: str, path: Path) -> None:
    """The headline metric on the test split per epoch, mean over seeds, one line per loss."""
    column = {"balanced_accuracy": "test_balanced_accuracy", "ece": "test_ece"}.get(headline, "test_accuracy")
    figure = new_figure(figsize=(10, 4))
    loss_axis, metric_axis = figure.subplots(1, 2)
    for loss, directories in _runs(rows, varying).items():
        histories = []
        for directory in directories:
            with (directory / "metrics.csv").open() as handle:
                histories.append(list(csv.DictReader(handle)))
        length = min(len(h) for h in histories)
        epochs = np.arange(1, length + 1)
        for axis, key in ((loss_axis, "test_nll"), (metric_axis, column)):
            values = np.array([[float(r[key]) for r in h[:length]] for h in histories])
            axis.plot(epochs, values.mean(0), label=loss)
    loss_axis.set(xlabel="epoch", ylabel="test NLL", title="Test NLL (mean over seeds)")
    metric_axis.set(xlabel="epoch", ylabel=column.replace("_", " "), title="Test metric (mean over seeds)")
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    _save(figure, path)


def plots(
    grid: Grid, rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], failed: list[OSError] | None = None
) -> list[Path]:
    """Draw the study's plots, each file written only where its picture changed; returns their paths. A plot that
    cannot be written raises its OSError, or adds it to ``failed`` and the others are drawn."""
    directory = grid.directory / "plots"
    varying = grid.varying[0] if grid.varying else None
    paths = [directory / name for name in PLOTS]
    drawings: list[Callable[[], None]] = [partial(plot_metrics, summary, varying, paths[0])]
    if _runs(rows, varying):
        drawings += [partial(plot_per_class, rows, varying, paths[1]),
                     partial(plot_reliability, rows, varying, paths[2]),
                     partial(plot_curves, rows, varying, grid.headline, paths[3])]  # fmt: skip
    else:  # every run diverged: nothing per class, per bin or per epoch to draw
        message = "every run of this study diverged (see each run's diverged.json)"
        drawings += [partial(_placeholder, path, message) for path in paths[1:]]
    for draw in drawings:
        try:
            draw()
        except OSError as error:
            if failed is None:
                raise
            failed.append(error)
    return paths


def _placeholder(path: Path, message: str) -> None:
    figure = new_figure(figsize=(6, 1.5))
    axis = figure.subplots()
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center")
    _save(figure, path)


def _save(figure: Figure, path: Path) -> None:
    """The figure as PNG (byte for byte the same for the same study), written only if that changes ``path``."""
    write_if_changed(path, png(figure))


def write_study(
    grid: Grid, rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], sentences: Sequence[str]
) -> tuple[list[Path], list[OSError]]:
    """Everything a study shows, from its rows, their summary and its findings: ``results.csv``, ``summary.csv``,
    the plots, ``report.md`` and ``report.html``, each written only where its content changed (a rerun of a finished
    study reads and does not write). Returns the files that hold them now and, for each file that could not be
    written, its error (naming the file)."""
    failed: list[OSError] = []
    tables = [grid.directory / "results.csv", grid.directory / "summary.csv"]
    for table_rows, path in zip((rows, summary), tables, strict=True):
        try:
            write_csv(table_rows, path, grid.name)
        except OSError as error:
            failed.append(error)
    figures = plots(grid, rows, summary, failed)
    failed += write_reports(grid, rows, summary, figures, sentences)
    unwritten = {Path(error.filename) for error in failed if error.filename}  # every writer names its file
    outputs = [*tables, *figures, grid.directory / "report.md", grid.directory / "report.html"]
    return [path for path in outputs if path not in unwritten], failed


# --- the written report -----------------------------------------------------------------------------------------


def _markdown_table(grid: Grid, summary: Sequence[dict[str, Any]]) -> list[str]:
    varying = grid.varying[0] if grid.varying else None
    lines = ["| loss | " + " | ".join(f"{h} {'↑' if up else '↓'}" for _, h, up, _ in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]  # fmt: skip
    for entry in summary:
        cells = _marked_cells(summary, entry, varying, "**{}**")
        lines.append(f"| {row_label(entry, varying)} | " + " | ".join(cells) + " |")
    return lines


def write_reports(
    grid: Grid,
    rows: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    figures: Sequence[Path],
    words: Sequence[str],
) -> list[OSError]:
    """``report.md`` (plots linked) and ``report.html`` (one file, plots embedded), with the study's findings
    ``words``, each written only where its content changed; returns the errors of those that could not be written."""
    settings = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in grid.settings.items())
    runs = [Path(row["run_dir"]).relative_to(grid.directory) for row in rows]
    md = [f"# xent compare — {grid.name}", "", f"**{grid.question}**", "",
          f"{len(grid.variants)} losses × {len(grid.seeds)} seeds"
          + (f" × {grid.varying[0]} {', '.join(f'{v:g}' for v in grid.varying[1])}" if grid.varying else "")
          + f"; shared settings: {settings}. Mean ± standard deviation over seeds; the best of each column in bold.",
          "", *_markdown_table(grid, summary), "", "## What the study shows", "",
          *(f"- {sentence}" for sentence in words), "", "## Plots", "",
          *(f"![{f.stem}](plots/{f.name})" for f in figures), "", "## Runs", "",
          *(f"- [{run}]({run}/summary.json)" for run in runs), ""]  # fmt: skip
    failed = []
    try:
        write_if_changed(grid.directory / "report.md", "\n".join(md).encode())
    except OSError as error:
        failed.append(error)
    images = "".join(
        f'<img alt="{f.stem}" src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}">'
        for f in figures
        if f.is_file()  # a plot that could not be written is left out, and said so
    )
    rows_html = "".join(_html_row(grid, summary, entry) for entry in summary)
    headings = "".join(f"<th>{html.escape(h)} {'↑' if up else '↓'}</th>" for _, h, up, _ in METRICS)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>xent compare — {grid.name}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}td,th{{padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}
img{{max-width:100%;display:block;margin:1em 0}}</style></head><body>
<h1>xent compare — {html.escape(grid.name)}</h1><p><b>{html.escape(grid.question)}</b></p>
<p>{html.escape(md[4])}</p><table><tr><th>loss</th>{headings}</tr>{rows_html}</table>
<h2>What the study shows</h2><ul>{"".join(f"<li>{html.escape(s)}</li>" for s in words)}</ul>
<h2>Plots</h2>{images}<h2>Runs</h2><ul>{"".join(f'<li><a href="{r}/summary.json">{r}</a></li>' for r in runs)}</ul>
</body></html>"""
    try:
        write_if_changed(grid.directory / "report.html", page.encode())
    except OSError as error:
        failed.append(error)
    return failed


def _html_row(grid: Grid, summary: Sequence[dict[str, Any]], entry: dict[str, Any]) -> str:
    varying = grid.varying[0] if grid.varying else None
    cells = "".join(f"<td>{cell}</td>" for cell in _marked_cells(summary, entry, varying, "<b>{}</b>"))
    return f"<tr><td>{html.escape(row_label(entry, varying))}</td>{cells}</tr>"
