"""What ``xent compare`` shows of a study: the terminal table, the plots, and ``report.md``/``report.html``, which say
in words what won, by how much and with what uncertainty, and link every run."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from xent.train.compare import METRICS, Grid, baseline_loss, best, gap
from xent.train.plots import _pyplot, _save

if TYPE_CHECKING:
    from rich.table import Table

PLOTS = ("metrics.png", "per_class.png", "reliability.png", "curves.png")


def _cell(entry: dict[str, Any], key: str, percent: bool) -> str:
    mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if percent else f"{mean:.3f} ± {std:.3f}"


def _marked_cells(
    summary: Sequence[dict[str, Any]], entry: dict[str, Any], varying: str | None, mark: str
) -> list[str]:
    """The entry's metric cells, each best of its column (among the entries of the same varying value) written
    through ``mark`` (a format string with ``{}``)."""
    peers = [e for e in summary if not varying or e[varying] == entry[varying]]
    return [
        mark.format(_cell(entry, key, percent)) if best(peers, key) is entry else _cell(entry, key, percent)
        for key, _, _, percent in METRICS
    ]


def _row_label(entry: dict[str, Any], varying: str | None) -> str:
    return cast(str, entry["loss"]) + (f" ({varying} {entry[varying]:g})" if varying else "")


def table(grid: Grid, summary: Sequence[dict[str, Any]]) -> Table:
    """A rich table: mean ± std over seeds, the best of each column (within each varying value) in bold with ★."""
    from rich.table import Table

    varying = grid.varying[0] if grid.varying else None
    seeds = f"{len(grid.seeds)} seed{'s' if len(grid.seeds) > 1 else ''}"
    result = Table(title=f"xent compare — {grid.name}: {grid.question} ({seeds}, mean ± std)")
    result.add_column("loss")
    for _, heading, higher, _ in METRICS:
        result.add_column(f"{heading} {'↑' if higher else '↓'}", justify="right")
    for entry in summary:
        result.add_row(_row_label(entry, varying), *_marked_cells(summary, entry, varying, "[bold]{} ★[/bold]"))
    return result


# --- plots ------------------------------------------------------------------------------------------------------


def _runs(rows: Sequence[dict[str, Any]], varying: str | None) -> dict[str, list[Path]]:
    """The run directories of each loss (and varying value) that trained to the end, by label."""
    runs: dict[str, list[Path]] = {}
    for row in rows:
        if (Path(row["run_dir"]) / "summary.json").is_file():
            runs.setdefault(_row_label(row, varying), []).append(Path(row["run_dir"]))
    return runs


def plot_metrics(summary: Sequence[dict[str, Any]], varying: str | None, path: Path) -> None:
    plt = _pyplot()
    shown = [m for m in METRICS if m[0] != "train_seconds"]
    figure, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6))
    labels = [_row_label(entry, varying) for entry in summary]
    for axis, (key, heading, higher, _) in zip(axes, shown, strict=True):
        means = [entry[f"{key}_mean"] for entry in summary]
        stds = [entry[f"{key}_std"] for entry in summary]
        axis.bar(range(len(summary)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
        axis.set_xticks(range(len(summary)))
        axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        axis.set_title(f"{heading} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    _save(plt, figure, path)


def plot_per_class(rows: Sequence[dict[str, Any]], varying: str | None, path: Path) -> None:
    """Test accuracy of each class against its training-set frequency (log axis): the long-tail picture."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for loss, directories in _runs(rows, varying).items():
        summaries = [json.loads((d / "summary.json").read_text()) for d in directories]
        counts = np.mean([s["class_counts"] for s in summaries], axis=0)
        accuracy = np.array([[np.nan if v is None else v for v in s["test_per_class_accuracy"].values()]
                             for s in summaries], dtype=float)  # fmt: skip
        order = np.argsort(counts)
        axis.plot(counts[order], np.nanmean(accuracy, axis=0)[order], marker="o", label=loss)
    axis.set(xscale="log", xlabel="training examples of the class (log)", ylabel="test accuracy of the class",
             ylim=(-0.02, 1.02), title="Per-class accuracy against class frequency (mean over seeds)")  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(plt, figure, path)


def plot_reliability(rows: Sequence[dict[str, Any]], varying: str | None, path: Path) -> None:
    """One reliability diagram per loss (and varying value), the bins of its seeds pooled."""
    plt = _pyplot()
    runs = _runs(rows, varying)
    figure, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.4), squeeze=False)
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
    _save(plt, figure, path)


def plot_curves(rows: Sequence[dict[str, Any]], varying: str | None, headline: str, path: Path) -> None:
    """The headline metric on the test split per epoch, mean over seeds, one line per loss."""
    plt = _pyplot()
    column = {"balanced_accuracy": "test_balanced_accuracy", "ece": "test_ece"}.get(headline, "test_accuracy")
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
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
    _save(plt, figure, path)


def plots(grid: Grid, rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]]) -> list[Path]:
    directory = grid.directory / "plots"
    varying = grid.varying[0] if grid.varying else None
    plot_metrics(summary, varying, directory / PLOTS[0])
    if _runs(rows, varying):
        plot_per_class(rows, varying, directory / PLOTS[1])
        plot_reliability(rows, varying, directory / PLOTS[2])
        plot_curves(rows, varying, grid.headline, directory / PLOTS[3])
    else:  # every run diverged: nothing per class, per bin or per epoch to draw
        for name in PLOTS[1:]:
            _placeholder(directory / name, "every run of this study diverged (see each run's diverged.json)")
    return [directory / name for name in PLOTS]


def _placeholder(path: Path, message: str) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 1.5))
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center")
    _save(plt, figure, path)


# --- the written report -----------------------------------------------------------------------------------------


def findings(grid: Grid, summary: Sequence[dict[str, Any]]) -> list[str]:
    """What won and by how much, in sentences: the headline metric's winner against cross-entropy (or the first
    loss) per varying value, each loss's paired gap to it and whether that gap exceeds its standard deviation over
    seeds, and what temperature scaling did."""
    varying = grid.varying[0] if grid.varying else None
    sentences = []
    values = sorted({cast(float, e.get(varying)) for e in summary}) if varying else [None]
    key, heading, higher, percent = next(m for m in METRICS if m[0] == grid.headline)
    scale = 100 if percent else 1
    for value in values:
        peers = [e for e in summary if not varying or e[varying] == value]
        where = f" at {varying} {value:g}" if varying else ""
        winner = best(peers, key)
        if not math.isfinite(winner[f"{key}_mean"]):
            sentences.append(f"Every loss diverged{where}: lower --lr, or add --grad-clip.")
            continue
        baseline = next(e for e in peers if e["loss"] == baseline_loss(summary))
        if winner is baseline:
            sentences.append(f"{winner['loss']} has the best {heading}{where}: {_cell(winner, key, percent)}.")
        else:
            sentences.append(_winner_sentence(winner, baseline, key, heading, percent, where, len(grid.seeds) > 1))
        if len(peers) == 1:
            continue
        ranking = sorted(peers, key=lambda e: e[f"{key}_mean"], reverse=higher)
        sentences.append(f"Ranking by {heading}{where}: " + " > ".join(e["loss"] for e in ranking) + ".")
        gaps = []
        for entry in peers:
            if entry is not baseline:
                mean, spread = gap(entry, key)
                digits = 1 if percent else 3
                verdict = "beyond one std" if abs(mean) > spread else "within one std"
                verdict = verdict if len(grid.seeds) > 1 else "one seed"
                if not math.isfinite(mean):
                    gaps.append(f"{entry['loss']} diverged")
                    continue
                gaps.append(f"{entry['loss']} {mean * scale:+.{digits}f} (std {spread * scale:.{digits}f}, {verdict})")
        sentences.append(
            f"{heading} against {baseline['loss']}{where}, the same seed's runs paired: " + "; ".join(gaps) + "."
        )
    for entry in summary:
        before, after = entry["ece_mean"], entry["ece_after_ts_mean"]
        if not (math.isfinite(before) and math.isfinite(after)):
            sentences.append(f"{_row_label(entry, varying)} diverged in at least one seed: no calibration to report.")
            continue
        verdict = f"cut {before / after:.1f}×" if 0 < after < before else "did not reduce"
        sentences.append(
            f"Temperature scaling {verdict} the ECE of {_row_label(entry, varying)}: {before:.3f} → {after:.3f}"
            + (" (fitted on NLL, it can cost an already calibrated model some ECE)." if after >= before else ".")
        )
    if len(grid.seeds) == 1:
        sentences.append("One seed per loss: the ± are 0 and say nothing; run --seeds 3 or more to judge a gap.")
    return sentences


def _winner_sentence(
    winner: dict[str, Any], baseline: dict[str, Any], key: str, heading: str, percent: bool, where: str, judged: bool
) -> str:
    """The winner against the baseline; ``judged``: there are seeds enough for a spread to judge the gap by."""
    mean, spread = gap(winner, key)
    scale, unit, digits = (100, " points", 1) if percent else (1, "", 3)
    clear = abs(mean) > spread
    sentence = (
        f"{winner['loss']} has the best {heading}{where}: {_cell(winner, key, percent)} against "
        f"{baseline['loss']}'s {_cell(baseline, key, percent)} — {'+' if mean > 0 else '−'}"
        f"{abs(mean) * scale:.{digits}f}{unit} on average over seeds"
    )
    if not judged:
        return sentence + "."
    return (
        f"{sentence}, {'more than' if clear else 'within'} one standard deviation of the per-seed differences "
        f"({spread * scale:.{digits}f}{unit})" + ("." if clear else ": not distinguishable with these seeds.")
    )


def _markdown_table(grid: Grid, summary: Sequence[dict[str, Any]]) -> list[str]:
    varying = grid.varying[0] if grid.varying else None
    lines = ["| loss | " + " | ".join(f"{h} {'↑' if up else '↓'}" for _, h, up, _ in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]  # fmt: skip
    for entry in summary:
        cells = _marked_cells(summary, entry, varying, "**{}**")
        lines.append(f"| {_row_label(entry, varying)} | " + " | ".join(cells) + " |")
    return lines


def write_reports(
    grid: Grid, rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], figures: Sequence[Path]
) -> None:
    """``report.md`` (plots linked) and ``report.html`` (one file, plots embedded)."""
    settings = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in grid.settings.items())
    runs = [Path(row["run_dir"]).relative_to(grid.directory) for row in rows]
    words = findings(grid, summary)
    md = [f"# xent compare — {grid.name}", "", f"**{grid.question}**", "",
          f"{len(grid.variants)} losses × {len(grid.seeds)} seeds"
          + (f" × {grid.varying[0]} {', '.join(f'{v:g}' for v in grid.varying[1])}" if grid.varying else "")
          + f"; shared settings: {settings}. Mean ± standard deviation over seeds; the best of each column in bold.",
          "", *_markdown_table(grid, summary), "", "## What the study shows", "",
          *(f"- {sentence}" for sentence in words), "", "## Plots", "",
          *(f"![{f.stem}](plots/{f.name})" for f in figures), "", "## Runs", "",
          *(f"- [{run}]({run}/summary.json)" for run in runs), ""]  # fmt: skip
    (grid.directory / "report.md").write_text("\n".join(md))
    images = "".join(
        f'<img alt="{f.stem}" src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}">' for f in figures
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
    (grid.directory / "report.html").write_text(page)


def _html_row(grid: Grid, summary: Sequence[dict[str, Any]], entry: dict[str, Any]) -> str:
    varying = grid.varying[0] if grid.varying else None
    cells = "".join(f"<td>{cell}</td>" for cell in _marked_cells(summary, entry, varying, "<b>{}</b>"))
    return f"<tr><td>{html.escape(_row_label(entry, varying))}</td>{cells}</tr>"
