"""What a study shows, in sentences: the leaders on the headline metric compared with each other, the ranking with
its ties, each loss against the baseline, identical losses explained, what temperature scaling did, and a
recommendation — every comparison pairs the same seed's runs, since a seed fixes the data for every loss.

These sentences end ``xent compare``'s output and make the "What the study shows" part of its reports.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from xent.train.aggregate import METRICS, UNRANKED, baseline_loss, mean_std_text, row_label

if TYPE_CHECKING:
    from xent.train.study import Grid


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
            sentences.append(f"{row_label(entry, varying)} diverged in at least one seed: no calibration to report.")
            continue
        verdict = f"cut {before / after:.1f}×" if 0 < after < before else "did not reduce"
        sentences.append(
            f"Temperature scaling {verdict} the ECE of {row_label(entry, varying)}: {before:.3f} → {after:.3f}"
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
        return f"Top on {heading}{where}: {short[id(winner)]}, {mean_std_text(winner, key, percent)}."
    if tied:
        paired = _paired(runs, winner, tied[0], key, varying)
        between = [f"{short[id(e)]} ({mean_std_text(e, key, percent)})" for e in (winner, *tied)]
        how = (f"the {len(paired.differences)} seeds disagree ({paired.words(scale, unit, digits)})"
               if len(paired.differences) == 2 else paired.words(scale, unit, digits))  # fmt: skip
        return (f"Top on {heading}{where}: a tie between {', '.join(between[:-1])} and {between[-1]} — "
                f"{winner['loss']} − {tied[0]['loss']} is {how}.")  # fmt: skip
    runner = ranked[1]
    paired = _paired(runs, winner, runner, key, varying)
    sentence = (f"Top on {heading}{where}: {short[id(winner)]}, {mean_std_text(winner, key, percent)}, ahead of "
                f"{short[id(runner)]} ({mean_std_text(runner, key, percent)}) — {winner['loss']} − {runner['loss']} is "
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
                    f"({mean_std_text(winner, key, percent)}), {calibrated(winner)}")  # fmt: skip
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
                f"on {heading} ({mean_std_text(first, key, percent)} against "
                f"{', '.join(mean_std_text(e, key, percent) for e in others)}), and the better calibrated: "
                f"{calibrated(first)} against {against} ({first['loss']} − {others[0]['loss']}: "
                f"{comparisons[0].words(1, '', 3)}).")  # fmt: skip
    tied_on = f"tied on {heading} ({', '.join(mean_std_text(e, key, percent) for e in top)})"
    values = ", ".join(f"{e[calibration + '_mean']:.3f}" for e in top)
    return (f"Recommendation{where}: {' or '.join(short[id(e)] for e in top)} — {tied_on} and on {label} "
            f"({values}): these seeds cannot separate them; run more seeds (--seeds) to choose.")  # fmt: skip
