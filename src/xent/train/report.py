"""What ``xent compare`` shows of a study: the terminal table, the plots, and ``report.md``/``report.html``, which say
in words what won, by how much and with what uncertainty, and link every run."""

from __future__ import annotations

import base64
import csv
import html
import itertools
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from xent.train.compare import METRICS, UNRANKED, Grid, aggregate, baseline_loss, best, write_csv, write_if_changed
from xent.train.plots import figure as new_figure
from xent.train.plots import png

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.table import Table

PLOTS = ("metrics.png", "per_class.png", "reliability.png", "curves.png")


def _cell(entry: dict[str, Any], key: str, percent: bool) -> str:
    mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if percent else f"{mean:.3f} ± {std:.3f}"


def _marked_cells(
    summary: Sequence[dict[str, Any]], entry: dict[str, Any], varying: str | None, mark: str
) -> list[str]:
    """The entry's metric cells, each best of its column (among the entries of the same varying value) written
    through ``mark`` (a format string with ``{}``); training time is shown, not crowned."""
    peers = [e for e in summary if not varying or e[varying] == entry[varying]]
    return [
        mark.format(_cell(entry, key, percent))
        if key not in UNRANKED and best(peers, key) is entry
        else _cell(entry, key, percent)
        for key, _, _, percent in METRICS
    ]


def _row_label(entry: dict[str, Any], varying: str | None) -> str:
    return cast(str, entry["loss"]) + (f" ({varying} {entry[varying]:g})" if varying else "")


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


MARKERS = "osD^vP*Xh<>p"
LINESTYLES = ("-", "--", "-.", ":")


def plot_metrics(summary: Sequence[dict[str, Any]], varying: str | None, path: Path) -> None:
    """Mean ± std over seeds of each metric, one point per loss; each axis spans the values (not 0 to them): the
    differences between the losses are what the study is about."""
    shown = [m for m in METRICS if m[0] not in UNRANKED]
    figure = new_figure(figsize=(3.2 * len(shown), 3.6))
    axes = figure.subplots(1, len(shown))
    labels = [_row_label(entry, varying) for entry in summary]
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


def write_study(grid: Grid, rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[OSError]]:
    """Everything a study shows, from its rows: ``results.csv``, ``summary.csv``, the plots, ``report.md`` and
    ``report.html``, each written only where its content changed (a rerun of a finished study reads and does not
    write). Returns the summary and, for each file that could not be written, its error (naming the file)."""
    varying = grid.varying[0] if grid.varying else None
    summary = aggregate(rows, varying)
    failed: list[OSError] = []
    for table_rows, name in ((rows, "results.csv"), (summary, "summary.csv")):
        try:
            write_csv(table_rows, grid.directory / name, grid.name)
        except OSError as error:
            failed.append(error)
    figures = plots(grid, rows, summary, failed)
    failed += write_reports(grid, rows, summary, figures)
    return summary, failed


# --- the written report -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paired:
    """``metric(a, seed) − metric(b, seed)`` over the seeds both have: a seed fixes the data for every loss, so the
    spread of these differences is the noise of the comparison, not how hard each seed's data happens to be."""

    differences: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences) if self.differences else math.nan

    @property
    def verdict(self) -> str:
        """``clear``: with 3 seeds or more the mean difference exceeds the standard deviation of the differences;
        with 2, both seeds have the same sign (too few seeds for a spread). ``tie`` otherwise; ``one seed``: no
        way to judge."""
        if len(self.differences) < 2:
            return "one seed"
        if len(self.differences) == 2:
            first, second = self.differences
            return "clear" if first * second > 0 else "tie"
        return "clear" if abs(self.mean) > statistics.stdev(self.differences) else "tie"

    def words(self, scale: float, unit: str, digits: int) -> str:
        """The differences as the study can speak of them: mean and spread from 3 seeds on, each seed's below."""
        values = [_signed(scale * d, digits) + unit for d in self.differences]
        if len(values) == 1:
            return f"{values[0]} on the one seed"
        if len(values) == 2:
            return f"{values[0]} and {values[1]} on the 2 seeds"
        spread = statistics.stdev(self.differences)
        return (
            f"{_signed(scale * self.mean, digits)}{unit} on average over the {len(values)} seeds, "
            f"{'more than' if self.verdict == 'clear' else 'within'} the standard deviation of the per-seed "
            f"differences ({scale * spread:.{digits}f}{unit})"
        )


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


Runs = dict[tuple[str, Any], dict[int, dict[str, Any]]]  # (loss, varying value) → seed → row of results.csv


def _by_seed(rows: Sequence[dict[str, Any]], varying: str | None) -> Runs:
    runs: Runs = {}
    for row in rows:
        runs.setdefault((row["loss"], row.get(varying) if varying else None), {})[int(row["seed"])] = row
    return runs


def _paired(runs: Runs, a: dict[str, Any], b: dict[str, Any], key: str, varying: str | None) -> Paired:
    value = a.get(varying) if varying else None
    first, second = runs.get((a["loss"], value), {}), runs.get((b["loss"], value), {})
    differences = [float(first[s][key]) - float(second[s][key]) for s in sorted(first) if s in second]
    return Paired(tuple(d for d in differences if math.isfinite(d)))


def _identical(runs: Runs, a: dict[str, Any], b: dict[str, Any], varying: str | None) -> bool:
    """The same result on every seed, metric for metric: one loss under two names (training time aside)."""
    value = a.get(varying) if varying else None
    first, second = runs.get((a["loss"], value), {}), runs.get((b["loss"], value), {})
    keys = [m[0] for m in METRICS if m[0] not in UNRANKED] + ["nll_after_ts"]
    return (
        bool(first)
        and first.keys() == second.keys()
        and all(float(first[s][k]) == float(second[s][k]) for s in first for k in keys)
    )


def _why_identical(grid: Grid, losses: Sequence[str]) -> str:
    variants = {v.label: v for v in grid.variants}
    names = sorted(variants[label].loss if label in variants else label for label in losses)
    la = next((variants[label] for label in losses if label in variants and variants[label].loss == "la"), None)
    tau = float(la.options.get("tau", grid.settings.get("tau", 1.0))) if la else math.nan
    if names == ["balanced-softmax", "la"] and tau == 1.0:
        return ("logit adjustment at τ = 1 is balanced softmax (both add the log of the class prior to the logits; "
                "Menon et al., 2021), so the two rows are one loss trained twice")  # fmt: skip
    return "for these settings they compute the same loss, so their rows are one loss trained twice"


def findings(grid: Grid, summary: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the study shows, in sentences: per varying value, the leaders on the headline metric compared with each
    other (paired over seeds; a tie said as one), the ranking with its ties, each loss against cross-entropy (or the
    first loss), losses with identical results explained, what temperature scaling did, and last a recommendation
    that weighs the headline metric and calibration (NLL). Training time is a cost, never a result to crown."""
    varying = grid.varying[0] if grid.varying else None
    runs = _by_seed(rows, varying)
    key, heading, higher, percent = next(m for m in METRICS if m[0] == grid.headline)
    scale, digits = (100, 1) if percent else (1, 3)
    seeds = len(grid.seeds)
    sentences, recommendations, explained = [], [], set()
    values = sorted({cast(float, e.get(varying)) for e in summary}) if varying else [None]
    for value in values:
        peers = [e for e in summary if not varying or e[varying] == value]
        where = f" at {varying} {value:g}" if varying else ""
        finite = [e for e in peers if math.isfinite(e[f"{key}_mean"])]
        if not finite:
            sentences.append(f"Every loss diverged{where}: lower --lr, or add --grad-clip.")
            continue
        clusters: list[list[dict[str, Any]]] = []  # losses with identical results, one entry per loss otherwise
        for entry in finite:
            home = next((c for c in clusters if _identical(runs, c[0], entry, varying)), None)
            if home is not None:
                home.append(entry)
            else:
                clusters.append([entry])
        names = {id(c[0]): " = ".join(e["loss"] for e in c) for c in clusters}  # a loss named with its twins
        for cluster in clusters:
            labels = tuple(e["loss"] for e in cluster)
            if len(cluster) > 1 and labels not in explained:
                explained.add(labels)
                sentences.append(f"{' and '.join(labels)} gave identical results on every seed{where}: "
                                 f"{_why_identical(grid, labels)}.")  # fmt: skip
        ranked = sorted((c[0] for c in clusters), key=lambda e: e[f"{key}_mean"], reverse=higher)
        winner = ranked[0]
        tied = [e for e in ranked[1:] if _paired(runs, winner, e, key, varying).verdict == "tie"]
        sentences.append(_leader_sentence(runs, ranked, tied, names, key, heading, percent, where, varying))
        if len(ranked) > 1:
            sentences.append(_ranking_sentence(runs, ranked, names, peers, key, heading, where, varying, seeds))
        baseline = next((e for e in peers if e["loss"] == baseline_loss(summary)), None)
        if baseline is not None and len(peers) > 1:
            gaps = []
            for entry in (e for e in peers if e is not baseline):
                paired = _paired(runs, entry, baseline, key, varying)
                if not paired.differences:
                    gaps.append(f"{entry['loss']} diverged")
                elif len(paired.differences) >= 3:
                    spread = scale * statistics.stdev(paired.differences)
                    gaps.append(f"{entry['loss']} {_signed(scale * paired.mean, digits)} (std {spread:.{digits}f}, "
                                f"{'beyond' if paired.verdict == 'clear' else 'within'} one std)")  # fmt: skip
                else:
                    gaps.append(f"{entry['loss']} {paired.words(scale, '', digits)}")
            sentences.append(f"{heading} against {baseline['loss']}{where}, the same seed's runs paired: "
                             + "; ".join(gaps) + ".")  # fmt: skip
        recommendations.append(_recommendation(runs, [winner, *tied], ranked, names, grid, where, varying))
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
    if seeds == 1:
        sentences.append("One seed per loss: the ± are 0 and say nothing; run --seeds 3 or more to judge a gap.")
    return sentences + recommendations


def _leader_sentence(
    runs: Runs,
    ranked: list[dict[str, Any]],
    tied: list[dict[str, Any]],
    short: dict[int, str],
    key: str,
    heading: str,
    percent: bool,
    where: str,
    varying: str | None,
) -> str:
    """The leader on the headline metric against the next best, the same seed's runs paired."""
    scale, unit, digits = (100, " points", 1) if percent else (1, "", 3)
    winner = ranked[0]
    if len(ranked) == 1:
        return f"Top on {heading}{where}: {short[id(winner)]}, {_cell(winner, key, percent)}."
    if tied:
        paired = _paired(runs, winner, tied[0], key, varying)
        between = [f"{short[id(e)]} ({_cell(e, key, percent)})" for e in (winner, *tied)]
        how = (f"the {len(paired.differences)} seeds disagree ({paired.words(scale, unit, digits)})"
               if len(paired.differences) == 2 else paired.words(scale, unit, digits))  # fmt: skip
        return (f"Top on {heading}{where}: a tie between {', '.join(between[:-1])} and {between[-1]} — "
                f"{winner['loss']} − {tied[0]['loss']} is {how}.")  # fmt: skip
    runner = ranked[1]
    paired = _paired(runs, winner, runner, key, varying)
    sentence = (f"Top on {heading}{where}: {short[id(winner)]}, {_cell(winner, key, percent)}, ahead of "
                f"{short[id(runner)]} ({_cell(runner, key, percent)}) — {winner['loss']} − {runner['loss']} is "
                f"{paired.words(scale, unit, digits)}")  # fmt: skip
    if len(paired.differences) == 2:
        return sentence + ": ahead on both, but 2 seeds are too few to weigh a gap against the noise (--seeds 3)."
    if len(paired.differences) < 2:
        return sentence + ": one seed cannot tell a gap from noise."
    return sentence + "."


def _ranking_sentence(
    runs: Runs,
    ranked: list[dict[str, Any]],
    names: dict[int, str],
    peers: Sequence[dict[str, Any]],
    key: str,
    heading: str,
    where: str,
    varying: str | None,
    seeds: int,
) -> str:
    """Best first; ``≈`` between neighbours the seeds cannot separate, ``=`` between identical runs."""
    text = names[id(ranked[0])]
    ties = False
    for better, worse in itertools.pairwise(ranked):
        tie = _paired(runs, better, worse, key, varying).verdict == "tie"
        ties |= tie
        text += f" {'≈' if tie else '>'} {names[id(worse)]}"
    notes = ["≈: the seeds disagree on the order" if seeds == 2 else "≈: within the per-seed spread"] if ties else []
    notes += ["=: identical runs"] if any(" = " in name for name in names.values()) else []
    diverged = [e["loss"] for e in peers if not math.isfinite(e[f"{key}_mean"])]
    return (f"Ranking by {heading}{where}: {text}" + (f" ({'; '.join(notes)})" if notes else "")
            + (f"; diverged: {', '.join(diverged)}" if diverged else "") + ".")  # fmt: skip


def _recommendation(
    runs: Runs,
    top: list[dict[str, Any]],
    ranked: list[dict[str, Any]],
    short: dict[int, str],
    grid: Grid,
    where: str,
    varying: str | None,
) -> str:
    """Among the losses tied at the top of the headline metric, the best calibrated (NLL; ECE when the headline is
    NLL) — or the clear leader, with a word on calibration where another loss is clearly better calibrated."""
    key, heading, _, percent = next(m for m in METRICS if m[0] == grid.headline)
    calibration = "ece" if key == "nll" else "nll"
    label = next(m[1] for m in METRICS if m[0] == calibration)

    def calibrated(entry: dict[str, Any]) -> str:
        return f"{label} {entry[f'{calibration}_mean']:.3f}"

    if len(top) == 1:
        winner = top[0]
        sentence = (f"Recommendation{where}: {short[id(winner)]} — the best {heading} "
                    f"({_cell(winner, key, percent)}), {calibrated(winner)}")  # fmt: skip
        better = [e for e in ranked[1:] if e[f"{calibration}_mean"] < winner[f"{calibration}_mean"]
                  and _paired(runs, e, winner, calibration, varying).verdict == "clear"]  # fmt: skip
        if len(grid.seeds) == 1:
            sentence += " — provisional: one seed cannot tell the leaders apart"
        elif better:
            sentence += (f"; where calibrated probabilities matter more than {heading}, {short[id(better[0])]} "
                         f"has the better {label} ({better[0][f'{calibration}_mean']:.3f})")  # fmt: skip
        return sentence + "."
    first = min(top, key=lambda e: e[f"{calibration}_mean"])
    others = [e for e in top if e is not first]
    comparisons = [_paired(runs, first, e, calibration, varying) for e in others]
    if all(c.verdict == "clear" for c in comparisons):
        against = ", ".join(f"{e[f'{calibration}_mean']:.3f} for {e['loss']}" for e in others)
        return (f"Recommendation{where}: {short[id(first)]} — tied with {' and '.join(short[id(e)] for e in others)} "
                f"on {heading} ({_cell(first, key, percent)} against "
                f"{', '.join(_cell(e, key, percent) for e in others)}), and the better calibrated: {calibrated(first)} "
                f"against {against} ({first['loss']} − {others[0]['loss']}: "
                f"{comparisons[0].words(1, '', 3)}).")  # fmt: skip
    tied_on = f"tied on {heading} ({', '.join(_cell(e, key, percent) for e in top)})"
    values = ", ".join(f"{e[calibration + '_mean']:.3f}" for e in top)
    return (f"Recommendation{where}: {' or '.join(short[id(e)] for e in top)} — {tied_on} and on {label} "
            f"({values}): these seeds cannot separate them; run more seeds (--seeds) to choose.")  # fmt: skip


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
) -> list[OSError]:
    """``report.md`` (plots linked) and ``report.html`` (one file, plots embedded), each written only where its
    content changed; returns the errors of those that could not be written."""
    settings = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in grid.settings.items())
    runs = [Path(row["run_dir"]).relative_to(grid.directory) for row in rows]
    words = findings(grid, summary, rows)
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
    return f"<tr><td>{html.escape(_row_label(entry, varying))}</td>{cells}</tr>"
