"""From the rows of ``results.csv`` (one per cell) to the summary of ``summary.csv``: per loss (and varying value),
the mean and standard deviation over seeds of every metric and the paired gap to the baseline loss — and how an entry
of the summary is named and written in the study's tables and sentences.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from xent.train.cells import write_if_changed

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
UNRANKED = frozenset({"train_seconds"})  # a cost shown beside the results, never a result to crown


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
    """``rows`` as CSV with a ``study`` column first, written only if that changes ``path``."""
    columns = ["study", *dict.fromkeys(key for row in rows for key in row)]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({"study": study, **row})
    write_if_changed(path, buffer.getvalue().encode())


def best(summary: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The entry with the best mean; a diverged loss (NaN) never wins."""
    higher = next(m[2] for m in METRICS if m[0] == metric)
    finite = [entry for entry in summary if math.isfinite(entry[f"{metric}_mean"])] or list(summary)
    return (max if higher else min)(finite, key=lambda entry: entry[f"{metric}_mean"])


def gap(entry: dict[str, Any], metric: str) -> tuple[float, float]:
    """The entry's paired gap to the baseline in ``metric``: mean and standard deviation over seeds."""
    return entry[f"{metric}_gap_mean"], entry[f"{metric}_gap_std"]


def mean_std_text(entry: dict[str, Any], key: str, percent: bool) -> str:
    """The entry's ``key`` as the tables write it: ``79.7 ± 2.6`` (a percentage) or ``0.676 ± 0.081``."""
    mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if percent else f"{mean:.3f} ± {std:.3f}"


def row_label(entry: dict[str, Any], varying: str | None) -> str:
    """The name of a row (of results.csv) or entry (of summary.csv): its loss, with the varying value if any."""
    return cast(str, entry["loss"]) + (f" ({varying} {entry[varying]:g})" if varying else "")
