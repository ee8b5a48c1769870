"""The bench's outputs: a rich table, a CSV file and a plot of time and memory against the vocabulary size."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from xent.bench.runner import Measurement

if TYPE_CHECKING:
    from rich.console import Console

MB = 1 << 20


def ratios(measurements: Sequence[Measurement]) -> dict[str, dict[str, float | None]]:
    """For each implementation: time over the best implementation of another library (xent's rows are compared
    with torch, Liger and CCE, not with each other), time over the floor, and peak memory minus the memory floor
    (the gradients it must return)."""
    measured = [m for m in measurements if m.time_s is not None]
    floor = next((m for m in measured if m.is_floor), None)
    result: dict[str, dict[str, float | None]] = {}
    for m in measured:  # each with its time_s
        others = [cast(float, o.time_s) for o in measured if _library(o.name) != _library(m.name) and not o.is_floor]
        peak = m.peak
        result[m.name] = {
            "vs_best_other": cast(float, m.time_s) / min(others) if others and not m.is_floor else None,
            "vs_floor": cast(float, m.time_s) / cast(float, floor.time_s) if floor and not m.is_floor else None,
            "extra_over_floor_mb": (peak - m.problem.floor_bytes()) / MB
            if peak is not None and not m.is_floor
            else None,
        }
    return result


# Beyond this spread of its runs ((max - min) / median) an implementation's median cannot be trusted to rank it.
NOISY_SPREAD = 0.5


def spread(measurement: Measurement) -> float | None:
    """(max − min) / median of the timed runs: 0.1 is a steady machine; above :data:`NOISY_SPREAD`, too noisy."""
    times = measurement.times_s
    return (max(times) - min(times)) / measurement.time_s if times and measurement.time_s else None


def noisy(measurements: Sequence[Measurement]) -> list[str]:
    """The implementations whose runs vary too much for their medians to rank them."""
    return [m.name for m in measurements if (s := spread(m)) is not None and s > NOISY_SPREAD]


def _library(name: str) -> str:
    return name.split("-")[0]


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def print_table(measurements: Sequence[Measurement], console: Console | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    problem = measurements[0].problem
    shape = f"N={problem.n}, V={problem.v}" + (f", D={problem.d}" if problem.operation == "linear-ce" else "")
    table = Table(title=f"xent bench {problem.operation} — {shape}, {problem.dtype}, {problem.device}")
    for column in (
        "implementation",
        "median ms",
        "runs ms",
        "spread",
        "warm-up s",
        "peak MB",
        "× best other",
        "× floor",
        "MB over grad",
    ):
        table.add_column(column, justify="left" if column == "implementation" else "right")
    table_ratios = ratios(measurements)
    for m in measurements:
        if m.skipped or m.time_s is None:
            table.add_row(m.name, "—", m.skipped or "no result", "", "", "", "", "", "", style="dim")
            continue
        r = table_ratios[m.name]
        table.add_row(
            m.name + (" (floor)" if m.is_floor else ""),
            f"{m.time_s * 1e3:.1f}",
            " ".join(f"{t * 1e3:.0f}" for t in m.times_s),
            _fmt(None if spread(m) is None else 100 * cast(float, spread(m)), ".0f") + " %",
            _fmt(m.warmup_s, ".1f"),
            _fmt(None if m.peak is None else m.peak / MB, ".0f"),
            _fmt(r["vs_best_other"], ".2f"),
            _fmt(r["vs_floor"], ".2f"),
            _fmt(r["extra_over_floor_mb"], ".0f"),
            style="bold" if m.name.startswith("xent") else None,
        )
    console.print(table)
    console.print(
        "peak MB: resident (CPU) or allocated (CUDA) memory above the inputs during one forward + backward; "
        "MB over grad: peak minus the gradients the step must return (the memory floor). Medians of interleaved runs; "
        "spread: (max − min) / median of the runs."
    )
    unsteady = noisy(measurements)
    if unsteady:
        console.print(
            f"[bold yellow]warning:[/] the runs of {', '.join(unsteady)} vary by more than {NOISY_SPREAD:.0%} of "
            "their median: the machine was busy, and the ratios above cannot rank the implementations. "
            "Close other work and run again with a larger --repeat (e.g. --repeat 7)."
        )


CSV_FIELDS = [
    "operation",
    "n",
    "d",
    "v",
    "dtype",
    "device",
    "implementation",
    "is_floor",
    "median_ms",
    "runs_ms",
    "warmup_s",
    "peak_mb",
    "vs_best_other",
    "vs_floor",
    "extra_over_floor_mb",
    "skipped",
]


def write_csv(path: Path, measurements: Sequence[Measurement]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for group in _by_problem(measurements):
        group_ratios = ratios(group)
        for m in group:
            r = group_ratios.get(m.name, {})
            p = m.problem
            rows.append(
                {
                    "operation": p.operation,
                    "n": p.n,
                    "d": p.d,
                    "v": p.v,
                    "dtype": p.dtype,
                    "device": p.device,
                    "implementation": m.name,
                    "is_floor": m.is_floor,
                    "median_ms": None if m.time_s is None else round(m.time_s * 1e3, 3),
                    "runs_ms": " ".join(f"{t * 1e3:.3f}" for t in m.times_s),
                    "warmup_s": m.warmup_s,
                    "peak_mb": None if m.peak is None else round(m.peak / MB, 1),
                    "vs_best_other": r.get("vs_best_other"),
                    "vs_floor": r.get("vs_floor"),
                    "extra_over_floor_mb": r.get("extra_over_floor_mb"),
                    "skipped": m.skipped,
                }
            )
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _by_problem(measurements: Sequence[Measurement]) -> list[list[Measurement]]:
    groups: dict[object, list[Measurement]] = {}
    for m in measurements:
        groups.setdefault(m.problem, []).append(m)
    return list(groups.values())


def plot(path: Path, measurements: Sequence[Measurement]) -> None:
    """Time and peak memory of each implementation against the vocabulary size V."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(m.name for m in measurements))
    for name in names:
        points = sorted((m.problem.v, m) for m in measurements if m.name == name and m.time_s is not None)
        if not points:
            continue
        vocab = [v for v, _ in points]
        style = {"linestyle": "--", "color": "gray"} if points[0][1].is_floor else {"marker": "o"}
        time_axis.plot(vocab, [cast(float, m.time_s) * 1e3 for _, m in points], label=name, **style)
        if not points[0][1].is_floor and all(m.peak is not None for _, m in points):
            memory_axis.plot(vocab, [cast(int, m.peak) / MB for _, m in points], label=name, **style)
    problem = measurements[0].problem
    for axis, label in ((time_axis, "forward + backward (ms)"), (memory_axis, "peak memory above inputs (MB)")):
        axis.set_xlabel("vocabulary size V")
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"xent bench {problem.operation}: N={problem.n}, {problem.dtype}, {problem.device}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
