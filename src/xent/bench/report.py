"""The bench's outputs: a rich table with its verdict, a CSV file and a plot of time and memory against the
vocabulary size."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from xent.bench.problem import FAILED, Unavailable
from xent.bench.runner import Measurement

if TYPE_CHECKING:
    from rich.console import Console

MB = 1 << 20
# What each baseline row is, for the legend under its table.
BASELINES = {
    "xent-linear-ce": "the student head's linear_cross_entropy on the same inputs, not ranked (with a teacher head a "
    "distillation's floor is four GEMMs to cross-entropy's three: 4/3 of its time)",
}


def ratios(measurements: Sequence[Measurement]) -> dict[str, dict[str, float | None]]:
    """For each implementation: time and peak memory over the best implementation of another library (xent's rows
    are compared with torch, Liger, CCE and TRL, not with each other), time over the floor and over the baseline
    (where the operation has one), and peak memory minus the memory floor (the gradients it must return)."""
    measured = [m for m in measurements if m.time_s is not None]
    floor = next((m for m in measured if m.is_floor), None)
    baseline = next((m for m in measured if m.is_baseline), None)
    result: dict[str, dict[str, float | None]] = {}
    for m in measured:  # each with its time_s
        ranked = not m.is_floor and not m.is_baseline
        others = [o for o in measured if _library(o.name) != _library(m.name) and not o.is_floor and not o.is_baseline]
        other_peaks = [o.peak for o in others if o.peak is not None]
        peak, time_s = m.peak, cast(float, m.time_s)
        result[m.name] = {
            "vs_best_other": time_s / min(cast(float, o.time_s) for o in others) if others and ranked else None,
            "peak_vs_best_other": peak / min(other_peaks)
            if peak is not None and other_peaks and min(other_peaks) > 0 and ranked
            else None,
            "vs_floor": time_s / cast(float, floor.time_s) if floor and not m.is_floor else None,
            "vs_baseline": time_s / cast(float, baseline.time_s) if baseline and ranked else None,
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


def _ms(seconds: float) -> str:
    milliseconds = seconds * 1e3
    return format(milliseconds, ".0f" if milliseconds >= 100 else ".1f" if milliseconds >= 10 else ".2f")


def _mb(size: float) -> str:
    return format(size / MB, ".0f" if size >= 10 * MB else ".1f")


def _ranked(measurements: Sequence[Measurement]) -> list[Measurement]:
    """The implementations that ran (the floor and the baseline are not implementations), fastest first."""
    return sorted(
        (m for m in measurements if m.time_s is not None and not m.is_floor and not m.is_baseline),
        key=lambda m: m.time_s or 0,
    )


def _fastest(ranked: list[Measurement]) -> str:
    best = ranked[0]
    if len(ranked) == 1:
        return f"fastest: {best.name}, the only implementation that ran ({_ms(cast(float, best.time_s))} ms)"
    second = ranked[1]
    best_time, second_time = cast(float, best.time_s), cast(float, second.time_s)
    if max(best.times_s) >= min(second.times_s):  # a run of the runner-up was as fast as one of the winner's
        return (
            f"fastest: {best.name} and {second.name} cannot be told apart — their runs overlap "
            f"({_ms(min(best.times_s))}–{_ms(max(best.times_s))} and {_ms(min(second.times_s))}–"
            f"{_ms(max(second.times_s))} ms; a larger --repeat may separate them)"
        )
    return (
        f"fastest: {best.name}, {best_time / second_time:.2f}× the time of the runner-up {second.name} "
        f"({_ms(best_time)} against {_ms(second_time)} ms)"
    )


# Resident memory moves by pages and allocator arenas: peaks closer than this are the same peak.
MEMORY_TIE_BYTES = MB


def _leanest(ranked: list[Measurement]) -> str:
    by_peak = sorted((m for m in ranked if m.peak is not None), key=lambda m: m.peak or 0)
    if not by_peak:
        return "leanest: not measured (no peak memory on this machine)"
    best = by_peak[0]
    peak = cast(int, best.peak)
    gradient = f"{peak / best.problem.floor_bytes():.2f}× the gradient it must return"
    if len(by_peak) == 1:
        return f"leanest: {best.name}, the only one measured ({_mb(peak)} MB above its inputs, {gradient})"
    second = by_peak[1]
    second_peak = cast(int, second.peak)
    if second_peak - peak <= MEMORY_TIE_BYTES:
        peaks = _mb(peak) if _mb(peak) == _mb(second_peak) else f"{_mb(peak)}–{_mb(second_peak)}"
        return f"leanest: {best.name} and {second.name} tie at {peaks} MB ({gradient})"
    return (
        f"leanest: {best.name}, {_mb(peak)} MB above its inputs, {gradient} and {peak / second_peak:.2f}× the "
        f"peak of the runner-up {second.name} ({_mb(second_peak)} MB)"
    )


def verdict(measurements: Sequence[Measurement]) -> str:
    """One line: what won on time and on memory, by how much over the runner-up, or that the runs cannot tell the
    first two apart; computed from the measured rows (not the floor's or the baseline's)."""
    ranked = _ranked(measurements)
    if not ranked:
        return "verdict: no implementation ran"
    return f"verdict — {_fastest(ranked)}; {_leanest(ranked)}. Ratios below 1 are better."


def not_run(measurements: Sequence[Measurement]) -> str | None:
    """The implementations that did not run, in one line grouped by why: ``not run — not installed: liger
    (liger_kernel); needs CUDA: xent-chunked (…)``; None when all ran."""
    by_kind: dict[str, dict[str, list[str]]] = {}  # kind -> detail -> names
    for m in measurements:
        if m.time_s is None:
            reason = m.skipped or Unavailable(FAILED, "no result")
            by_kind.setdefault(reason.kind, {}).setdefault(reason.detail, []).append(m.name)
    if not by_kind:
        return None
    kinds = (
        f"{kind}: "
        + "; ".join(", ".join(names) + (f" ({detail})" if detail else "") for detail, names in details.items())
        for kind, details in by_kind.items()
    )
    return "not run — " + " · ".join(kinds)


def _with_spinners(count: int) -> str:
    return f"with {count} spinning process{'es' if count > 1 else ''}"


def _title(measurements: Sequence[Measurement]) -> str:
    problem = measurements[0].problem
    shape = f"N={problem.n}, V={problem.v}" + (f", D={problem.d}" if problem.operation != "ce" else "")
    title = f"xent bench {problem.operation} — {shape}, {problem.dtype}, {problem.device}"
    if problem.distillation():
        title += f"; {problem.distillation()}"
    rounds = max(len(m.times_s) for m in measurements)
    if rounds:
        title += f"; medians of {rounds} interleaved runs (--repeat {rounds})"
    if measurements[0].spinning:
        title += f"; {_with_spinners(measurements[0].spinning)}"
    return title


def _baseline_legend(baseline: Measurement | None) -> str:
    if baseline is None:
        return ""
    return f"; × baseline: time over {baseline.name}'s, {BASELINES.get(baseline.name, 'a yardstick, not ranked')}"


def print_table(measurements: Sequence[Measurement], console: Console | None = None) -> None:
    """The table of the implementations that ran, the line of those that did not, what the columns mean, the verdict
    and the warnings."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=_title(measurements))
    baseline = next((m for m in measurements if m.is_baseline and m.time_s is not None), None)
    columns = ["implementation", "median ms", "runs ms", "spread", "warm-up s", "peak MB", "× best other",
               "peak × other", "× floor", *(["× baseline"] if baseline else []), "MB over grad"]  # fmt: skip
    for column in columns:
        if column == "implementation":
            table.add_column(column, no_wrap=True)  # a name in one piece: "xent-linear-ce (baseline)"
        else:
            table.add_column(column, justify="right")
    table_ratios = ratios(measurements)
    for m in measurements:
        if m.time_s is None:
            continue  # folded into the line under the table
        r = table_ratios[m.name]
        table.add_row(
            m.name + (" (floor)" if m.is_floor else " (baseline)" if m.is_baseline else ""),
            f"{m.time_s * 1e3:.1f}",
            " ".join(f"{t * 1e3:.0f}" for t in m.times_s),
            _fmt(None if spread(m) is None else 100 * cast(float, spread(m)), ".0f") + " %",
            _fmt(m.warmup_s, ".1f"),
            _fmt(None if m.peak is None else m.peak / MB, ".0f"),
            _fmt(r["vs_best_other"], ".2f"),
            _fmt(r["peak_vs_best_other"], ".2f"),
            _fmt(r["vs_floor"], ".2f"),
            *([_fmt(r["vs_baseline"], ".2f")] if baseline else []),
            _fmt(r["extra_over_floor_mb"], ".0f"),
            style="bold" if m.name.startswith("xent") and not m.is_baseline else None,
        )
    console.print(table)
    folded = not_run(measurements)
    if folded:
        console.print(folded, style="dim", markup=False, highlight=False)
    console.print(
        "peak MB: resident (CPU) or allocated (CUDA) memory above the inputs during one forward + backward; "
        "MB over grad: peak minus the gradients the step must return (the memory floor). × best other: time over the "
        "fastest implementation of another library (xent's rows against torch, Liger, CCE and TRL) — below 1, faster "
        "than all of them; peak × other: peak over the leanest of them; × floor: time over the least work any "
        "implementation must do (1 = as fast as the floor)"
        + _baseline_legend(baseline)
        + ". Medians of interleaved runs; spread: (max − min) / median of the runs.",
        markup=False,
    )
    console.print(verdict(measurements), style="bold", markup=False, highlight=False)
    unsteady = noisy(measurements)
    if unsteady:
        spinners = measurements[0].spinning
        cause = f"{_with_spinners(spinners)} beside them" if spinners else "the machine was busy"
        advice = "Run again" if spinners else "Close other work and run again"
        console.print(
            f"[bold yellow]warning:[/] the runs of {', '.join(unsteady)} vary by more than {NOISY_SPREAD:.0%} of "
            f"their median: {cause}, and the ratios above cannot rank the implementations. "
            f"{advice} with a larger --repeat (e.g. --repeat 7)."
        )


CSV_FIELDS = [
    "operation",
    "n",
    "d",
    "v",
    "dtype",
    "device",
    "distillation",
    "implementation",
    "is_floor",
    "is_baseline",
    "median_ms",
    "runs_ms",
    "warmup_s",
    "peak_mb",
    "vs_best_other",
    "peak_vs_best_other",
    "vs_floor",
    "vs_baseline",
    "extra_over_floor_mb",
    "skipped",
    "spinning",
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
                    "distillation": p.distillation(),
                    "implementation": m.name,
                    "is_floor": m.is_floor,
                    "is_baseline": m.is_baseline,
                    "median_ms": None if m.time_s is None else round(m.time_s * 1e3, 3),
                    "runs_ms": " ".join(f"{t * 1e3:.3f}" for t in m.times_s),
                    "warmup_s": m.warmup_s,
                    "peak_mb": None if m.peak is None else round(m.peak / MB, 1),
                    "vs_best_other": r.get("vs_best_other"),
                    "peak_vs_best_other": r.get("peak_vs_best_other"),
                    "vs_floor": r.get("vs_floor"),
                    "vs_baseline": r.get("vs_baseline"),
                    "extra_over_floor_mb": r.get("extra_over_floor_mb"),
                    "skipped": None if m.skipped is None else str(m.skipped),
                    "spinning": m.spinning,
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
    from xent.train.plots import figure as new_figure
    from xent.train.plots import save

    figure = new_figure(figsize=(11, 4.2))
    time_axis, memory_axis = figure.subplots(1, 2)
    names = list(dict.fromkeys(m.name for m in measurements))
    for name in names:
        points = sorted((m.problem.v, m) for m in measurements if m.name == name and m.time_s is not None)
        if not points:
            continue
        vocab = [v for v, _ in points]
        first = points[0][1]
        style = (
            {"linestyle": "--", "color": "gray"}
            if first.is_floor
            else {"linestyle": ":", "marker": "s", "color": "gray"}
            if first.is_baseline
            else {"marker": "o"}
        )
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
    busy = f", {_with_spinners(measurements[0].spinning)}" if measurements[0].spinning else ""
    distillation = f", {problem.distillation()}" if problem.distillation() else ""
    figure.suptitle(
        f"xent bench {problem.operation}: N={problem.n}, {problem.dtype}, {problem.device}{distillation}{busy}"
    )
    save(figure, path, dpi=100)
