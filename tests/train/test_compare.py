"""xent compare: the grid, its errors before any work, resume, and the aggregation — every number of results.csv and
summary.csv recomputed here from the run directories."""

import csv
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.conftest import run_xent
from xent.cli import main
from xent.train.compare import STUDIES, Variant, aggregate, best, build_grid, run_grid

TINY = {"data": "digits", "epochs": 2, "imbalance_ratio": 10.0, "val_fraction": 0.2}


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small long-tail study run as a user runs it: 2 losses × 2 seeds, two processes at a time."""
    directory = tmp_path_factory.mktemp("compare") / "study"
    result = run_xent("compare", "--losses", "ce,la:tau=0.5", "--seeds", "2", "--epochs", "2",
                      "--imbalance-ratio", "10", "--jobs", "2", "--out", str(directory))  # fmt: skip
    return directory, result.stdout


def test_the_study_directory_holds_one_run_per_cell_and_every_output(study):
    directory, stdout = study
    runs = sorted(p.name for p in (directory / "runs").iterdir())
    assert runs == ["ce__seed0", "ce__seed1", "la_tau=0.5__seed0", "la_tau=0.5__seed1"]
    for run in runs:
        config = json.loads((directory / "runs" / run / "config.json").read_text())
        assert config["imbalance_ratio"] == 10.0 and config["epochs"] == 2  # the shared flags reached every run
        assert config["seed"] == int(run[-1]) and config["loss"] == run.split("_")[0]
    assert json.loads((directory / "runs" / "la_tau=0.5__seed0" / "config.json").read_text())["tau"] == 0.5
    for name in ("results.csv", "summary.csv", "report.md", "report.html", "study.json"):
        assert (directory / name).is_file(), name
    for plot in ("metrics", "per_class", "reliability", "curves"):
        assert (directory / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    html = (directory / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<img" in html  # one self-contained file
    markdown = (directory / "report.md").read_text()
    assert all(f"runs/{run}/summary.json" in markdown for run in runs)
    assert "## What the study shows" in markdown and "balanced acc." in markdown
    assert "balanced acc." in stdout and "report:" in stdout


def test_results_and_summary_are_the_run_directories_aggregated(study):
    directory, _ = study
    rows = _csv(directory / "results.csv")
    assert len(rows) == 4 and {row["study"] for row in rows} == {"long-tail"}
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        calibration = json.loads((Path(row["run_dir"]) / "calibration.json").read_text())
        assert float(row["balanced_accuracy"]) == pytest.approx(summary["test_balanced_accuracy"])
        assert float(row["nll"]) == pytest.approx(summary["test_nll"])
        assert float(row["ece_after_ts"]) == pytest.approx(calibration["ece_after"])
    for entry in _csv(directory / "summary.csv"):
        values = [float(json.loads((Path(r["run_dir"]) / "summary.json").read_text())["test_accuracy"])
                  for r in rows if r["loss"] == entry["loss"]]  # fmt: skip
        assert int(entry["seeds"]) == 2
        assert float(entry["accuracy_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(entry["accuracy_std"]) == pytest.approx(statistics.stdev(values))
        # the gap to cross-entropy pairs each seed's runs (same data): mean and std of the per-seed differences
        per_seed = {(r["loss"], r["seed"]): float(r["accuracy"]) for r in rows}
        paired = [per_seed[(entry["loss"], seed)] - per_seed[("ce", seed)] for seed in ("0", "1")]
        assert float(entry["accuracy_gap_mean"]) == pytest.approx(statistics.fmean(paired), abs=1e-12)
        assert float(entry["accuracy_gap_std"]) == pytest.approx(statistics.stdev(paired), abs=1e-12)


def test_temperature_scaling_is_fitted_on_the_validation_split(study):
    from xent.train.evaluate import evaluate_run

    directory, _ = study
    run = directory / "runs" / "ce__seed0"
    fitted = evaluate_run(run, temperature_scale=True)
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["temperature"] == pytest.approx(fitted["temperature"])
    assert saved["ece_after"] == pytest.approx(fitted["ece_after"])


def test_an_interrupted_study_resumes_where_it_stopped(tmp_path):
    grid = build_grid(tmp_path / "study", losses=["ce", "focal"], seeds=1, settings=TINY)
    run_grid(grid)
    finished, killed = (tmp_path / "study" / "runs" / name for name in ("ce__seed0", "focal__seed0"))
    kept = (finished / "summary.json").stat().st_mtime_ns
    # "kill" the focal run after its last checkpoint: no summary, no calibration, last.pt left
    (killed / "summary.json").unlink()
    (killed / "calibration.json").unlink()
    trained = (killed / "metrics.csv").stat().st_mtime_ns
    rows = run_grid(build_grid(tmp_path / "study", losses=["ce", "focal"], seeds=1, settings=TINY))
    assert (finished / "summary.json").stat().st_mtime_ns == kept  # a finished cell is not rerun
    assert (killed / "summary.json").is_file() and (killed / "calibration.json").is_file() and len(rows) == 2
    assert (killed / "metrics.csv").stat().st_mtime_ns == trained  # resumed from its checkpoint, no epoch redone
    other = build_grid(tmp_path / "study", losses=["ce", "gce"], seeds=1, settings=TINY)
    with pytest.raises(ValueError, match="holds another study"):
        run_grid(other)


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_stops_every_run_at_once_and_the_same_command_finishes_the_study(tmp_path, jobs):
    out = tmp_path / "study"
    command = [sys.executable, "-m", "xent", "compare", "--losses", "ce,gce", "--seeds", "1", "--epochs", "80",
               "--jobs", str(jobs), "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("runs/*/last.pt"))) < jobs:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [f"xent compare: interrupted; run the same command again to continue "
                                           f"(finished cells in {out} are kept)"]  # fmt: skip
    assert not list(out.glob("runs/*/summary.json"))  # the runs were stopped mid-training
    if jobs == 1:
        return  # the resume below is the same code for one job or two
    run_xent(*command[3:])
    for run in ("ce__seed0", "gce__seed0"):
        history = _csv(out / "runs" / run / "metrics.csv")
        assert [int(row["epoch"]) for row in history] == list(range(1, 81))  # resumed, each epoch once
        assert not list((out / "runs" / run).glob(".*.tmp"))


def test_a_grid_over_imbalance_ratios_has_its_column(tmp_path):
    grid = build_grid(tmp_path / "s", losses=["ce"], seeds=2, varying=("imbalance_ratio", [5, 20]),
                      settings={**TINY, "epochs": 1})  # fmt: skip
    cells = grid.cells()
    assert [c.directory.name for c in cells] == [
        "ce__imbalance_ratio=5.0__seed0", "ce__imbalance_ratio=5.0__seed1",
        "ce__imbalance_ratio=20.0__seed0", "ce__imbalance_ratio=20.0__seed1",
    ]  # fmt: skip
    close = build_grid(tmp_path / "t", losses=["ce"], seeds=1, varying=("label_noise", [0.1234561, 0.1234562]),
                       settings=TINY)  # fmt: skip
    assert len({c.directory for c in close.cells()}) == 2  # two values, two run directories
    assert cells[3].config(grid.settings).imbalance_ratio == 20.0
    rows = [{"loss": "ce", "imbalance_ratio": r, "seed": s, **dict.fromkeys(
        ["accuracy", "balanced_accuracy", "macro_f1", "nll", "ece", "ece_after_ts", "nll_after_ts", "train_seconds"],
        float(r + s))} for r in (5, 20) for s in (0, 1)]  # fmt: skip
    summary = aggregate(rows, "imbalance_ratio")
    assert [(e["imbalance_ratio"], e["accuracy_mean"]) for e in summary] == [(5, 5.5), (20, 20.5)]


def test_the_help_lists_the_studies_and_every_train_flag(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = capsys.readouterr().out
    assert all(f"{name}:" in help_text for name in STUDIES) and "40%" in help_text
    assert "--imbalance-ratio IMBALANCE_RATIO" in help_text and "--label-smoothing" in help_text
    assert "--resume" not in help_text  # the study resumes its own runs


def test_a_diverging_run_is_a_result_not_a_crash(tmp_path):
    """A loss that becomes NaN stops its run (the trainer's rule); the study records NaN metrics for that cell,
    finishes the others, and a rerun does not train the diverged cell again."""
    settings = {**TINY, "optimizer": "sgd", "lr": 1e12, "epochs": 2}
    rows = run_grid(build_grid(tmp_path / "study", losses=["ce", "gce"], seeds=1, settings=settings))
    by_loss = {row["loss"]: row for row in rows}
    assert math.isnan(by_loss["ce"]["accuracy"])
    assert json.loads((tmp_path / "study" / "runs" / "ce__seed0" / "diverged.json").read_text())["error"]
    summary = aggregate(rows, None)
    assert best(summary, "accuracy")["loss"] == "gce" or math.isnan(by_loss["gce"]["accuracy"])
    again = run_grid(build_grid(tmp_path / "study", losses=["ce", "gce"], seeds=1, settings=settings))
    assert [row["loss"] for row in again] == ["ce", "gce"]


def test_every_study_names_losses_the_trainer_has():
    for name, study in STUDIES.items():
        grid = build_grid(Path("unused"), study=name, seeds=1)
        assert [v.label for v in grid.variants] == list(study.losses)
    assert Variant.parse("ce:label-smoothing=0.1").options == {"label_smoothing": 0.1}
    assert Variant.parse("ce: --label-smoothing=0.10").label == "ce:label-smoothing=0.1"  # one spelling
    assert Variant.parse("ldam-drw:drw-epoch=30").options == {"drw_epoch": 30}  # an int field stays an int


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--losses", "ce,hinge"], "--losses hinge: unknown loss 'hinge'"),
        (["--losses", "hinge"], "--losses hinge: unknown loss 'hinge'; choose from ce, mse"),
        (
            ["--losses", "ce:gamma=2"],
            "--losses ce:gamma=2: ce takes FLAG=VALUE for the flags it reads (--label-smoothing)",
        ),
        (["--losses", "focal:gamma=x"], "focal:gamma=x: gamma='x' is not a number"),
        (["--losses", "ce,ce"], "--losses names a loss twice"),
        (["--losses", "ce:label-smoothing=0.1,ce: label-smoothing=0.10"], "--losses names a loss twice"),
        (["--losses", "ldam-drw:drw-epoch=2.5"], "drw-epoch takes a whole number, got 2.5"),
        (["--workers", "1", "--jobs", "2"], "--workers 1 starts loader processes"),
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--val-fraction", "0"], "xent compare fits temperature scaling on the validation split"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--imbalance-ratios", "10", "--label-noises", "0.2"], "give one of --imbalance-ratios and --label-noises"),
        (["--imbalance-ratios", "0.5"], "--imbalance-ratio must be at least 1"),
        (["--study", "nope"], "invalid choice: 'nope'"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_a_bad_grid_is_one_line_before_any_work(arguments, message, tmp_path, capsys):
    out = tmp_path / "study"
    try:
        code = main(["compare", "--out", str(out), *arguments])
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error, error
    assert not out.exists()  # nothing was started
