"""xent compare and run_study, its Python API: the grid, its errors before any work, resume, and the aggregation —
every number of results.csv and summary.csv recomputed here from the run directories."""

import csv
import json
import math
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.train.conftest import run_xent
from xent.cli import main
from xent.train import ConfigError, run_study
from xent.train.aggregate import aggregate, best
from xent.train.cells import run_grid
from xent.train.report import PLOTS
from xent.train.study import STUDIES, Variant, build_grid

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


def test_reused_workers_give_the_numbers_of_one_process(study, tmp_path):
    """--jobs 2 trains the four cells in two worker processes, each cell after another in the same process; every
    number equals the one of the same study trained cell after cell in this process (--jobs 1)."""
    directory, _ = study
    pids = {json.loads((run / ".lock").read_text())["pid"] for run in (directory / "runs").iterdir()}
    assert len(pids) <= 2  # the lock file names the process that trained the cell: workers were reused
    grid = build_grid(tmp_path / "one", losses=["ce", "la:tau=0.5"], seeds=2, settings={"epochs": 2,
                      "imbalance_ratio": 10.0})  # fmt: skip
    rows = run_grid(grid, jobs=1)
    reused = {(row["loss"], row["seed"]): row for row in _csv(directory / "results.csv")}
    for row in rows:
        other = reused[(row["loss"], str(row["seed"]))]
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "nll", "ece", "ece_after_ts", "temperature"):
            assert float(other[key]) == row[key], (row["loss"], row["seed"], key)


def test_a_run_that_fails_leaves_its_process_free_to_train_the_next(tmp_path):
    """A worker goes on to its next cell after a cell that raised: the run directory's lock is released and the
    next run in the same process trains as in a fresh one."""
    from xent.train import TrainConfig, TrainingDiverged, train
    from xent.train.checkpoint import lock

    with pytest.raises(TrainingDiverged):
        train(TrainConfig(out=str(tmp_path / "a"), epochs=1, optimizer="sgd", lr=1e12, quiet=True))
    lock(tmp_path / "a", "--out").release()  # flock is per open file: a lock still held would refuse this one
    first = train(TrainConfig(out=str(tmp_path / "b"), epochs=1, seed=3, quiet=True))
    again = train(TrainConfig(out=str(tmp_path / "c"), epochs=1, seed=3, quiet=True))
    assert {key: value for key, value in first.items() if key not in ("run_dir", "train_seconds")} == {
        key: value for key, value in again.items() if key not in ("run_dir", "train_seconds")
    }


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


# --- a study's directory: damaged results, two processes, kill -9, read-only -------------------------------------

STUDY_ARGUMENTS = ("--losses", "ce,la:tau=0.5", "--seeds", "2", "--epochs", "2", "--imbalance-ratio", "10")


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_rerun_of_a_finished_study_only_reads(study):
    directory, _ = study
    before = {name: mtime for name, mtime in _files(directory).items() if name != "study.lock"}
    result = run_xent("compare", *STUDY_ARGUMENTS, "--jobs", "2", "--out", str(directory))
    after = {name: mtime for name, mtime in _files(directory).items() if name != "study.lock"}
    assert after == before  # nothing rewritten: the same runs give the same results, plots and reports
    assert "report:" in result.stdout and "Traceback" not in result.stderr


def test_a_damaged_or_foreign_summary_is_named_and_its_cell_run_again(study, tmp_path, capsys):
    """A truncated, empty, binary summary.json, or one copied from another cell (its run_dir is that cell's): the
    cell is run again (from its last checkpoint) with one line naming the file — the study moved elsewhere is kept."""
    original, _ = study
    directory = tmp_path / "moved"
    shutil.copytree(original, directory)
    runs = directory / "runs"
    text = (runs / "ce__seed0" / "summary.json").read_text()
    (runs / "ce__seed0" / "summary.json").write_text(text[: len(text) // 2])
    (runs / "ce__seed1" / "summary.json").write_text("{}\n")
    (runs / "la_tau=0.5__seed0" / "summary.json").write_bytes(bytes(range(256)))
    (runs / "la_tau=0.5__seed1" / "summary.json").write_text(text)
    assert main(["compare", *STUDY_ARGUMENTS, "--jobs", "1", "--out", str(directory)]) == 0
    stderr = capsys.readouterr().err
    warnings = [line for line in stderr.splitlines() if line.strip()]
    assert len(warnings) == 4 and all("summary.json" in line for line in warnings), stderr
    for run in ("ce__seed0", "ce__seed1", "la_tau=0.5__seed0", "la_tau=0.5__seed1"):
        assert any(str(runs / run / "summary.json") in line for line in warnings), (run, warnings)
        summary = json.loads((runs / run / "summary.json").read_text())
        assert Path(summary["run_dir"]).name == run  # the cell's own result again
    assert any("ce__seed0" in line and "run_dir" in line for line in warnings)  # says whose summary it is
    rows = {(r["loss"], r["seed"]): r for r in _csv(directory / "results.csv")}
    for (loss, seed), row in rows.items():
        summary = json.loads((runs / Path(row["run_dir"]).name / "summary.json").read_text())
        assert float(row["accuracy"]) == pytest.approx(summary["test_accuracy"]), (loss, seed)
    assert rows[("la:tau=0.5", "1")]["run_dir"].endswith("la_tau=0.5__seed1")


def test_outputs_that_cannot_be_written_are_one_line_not_a_traceback(study, tmp_path, capsys):
    """A rerun of a finished study in a directory it cannot write: the table and findings are shown, and one line
    names what was not written (a directory in report.md's place stands for a read-only file, even for root)."""
    original, _ = study
    directory = tmp_path / "copy"
    shutil.copytree(original, directory)
    (directory / "report.md").unlink()
    (directory / "report.md").mkdir()
    (directory / "results.csv").write_text("stale\n")  # differs: rewritten
    code = main(["compare", *STUDY_ARGUMENTS, "--jobs", "1", "--out", str(directory)])
    captured = capsys.readouterr()
    assert code == 0
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not write report.md in" in lines[0], lines
    assert "balanced acc." in captured.out
    assert (directory / "results.csv").read_text() != "stale\n"


def _writes_read_only_files() -> bool:
    """Whether this process may write a file without write permission (root, CAP_DAC_OVERRIDE)."""
    with tempfile.TemporaryDirectory() as directory:
        probe = Path(directory) / "probe"
        probe.write_text("")
        probe.chmod(0o444)
        try:
            probe.open("a").close()
        except PermissionError:
            return False
        return True


@pytest.mark.skipif(_writes_read_only_files(), reason="this process writes read-only files (root)")
def test_a_read_only_finished_study_reruns(study, tmp_path, capsys):
    original, _ = study
    directory = tmp_path / "copy"
    shutil.copytree(original, directory)
    (directory / "summary.csv").write_text("stale\n")
    paths = [directory, *directory.rglob("*")]
    for path in paths:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        code = main(["compare", *STUDY_ARGUMENTS, "--jobs", "1", "--out", str(directory)])
    finally:
        for path in paths:
            path.chmod(path.stat().st_mode | 0o200)
    captured = capsys.readouterr()
    assert code == 0
    lines = [line for line in captured.err.splitlines() if line.strip()]
    # results.csv names each run's directory, which moved with the copy; summary.csv is stale
    assert len(lines) == 1 and "could not write results.csv, summary.csv in" in lines[0], lines
    assert "Permission denied" in lines[0] and "Traceback" not in captured.err


def _children(pid: int) -> list[int]:
    """The multiprocessing workers started by process ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in command:  # not the resource tracker
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_one_process_per_study_and_its_workers_die_with_it(tmp_path, capsys):
    """A second xent compare on a study in use is refused in one line naming the first; kill -9 of the first takes
    its workers with it, and the same command then finishes the study, each epoch of each cell trained once."""
    out = tmp_path / "study"
    arguments = ["compare", "--losses", "ce,gce", "--seeds", "1", "--epochs", "12", "--jobs", "2", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "xent", *arguments], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.glob("runs/*/config.json"))) < 2:
            time.sleep(0.05)
        workers = _children(first.pid)
        assert len(workers) == 2, workers
        assert main(arguments) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"pid {first.pid}" in error[0] and str(out) in error[0], error
        assert "in use by xent compare" in error[0]
        first.kill()  # kill -9
        first.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers)  # no orphan trains a cell beside the rerun
    finally:
        first.kill()
        first.wait()
    run_xent(*arguments)
    for run in ("ce__seed0", "gce__seed0"):
        history = _csv(out / "runs" / run / "metrics.csv")
        assert [int(row["epoch"]) for row in history] == list(range(1, 13))
        assert json.loads((out / "runs" / run / "summary.json").read_text())["epochs_completed"] == 12
        assert not list((out / "runs" / run).glob(".*.tmp"))


# --- run_study: the command's study from Python ----------------------------------------------------------------

# STUDY_ARGUMENTS as run_study's arguments
STUDY = {"losses": ["ce", "la:tau=0.5"], "seeds": 2, "settings": {"epochs": 2, "imbalance_ratio": 10.0}}
OUTPUTS = ["results.csv", "summary.csv", *(f"plots/{name}" for name in PLOTS), "report.md", "report.html"]


def _copy_without_outputs(original: Path, directory: Path) -> Path:
    """The finished study's cells, elsewhere, with none of the files written after training."""
    shutil.copytree(original, directory)
    for name in OUTPUTS:
        (directory / name).unlink()
    return directory


def _shown(report: Path) -> list[str]:
    """The bullets of a report.md's "What the study shows"."""
    lines = report.read_text().split("## What the study shows\n\n", 1)[1].split("\n\n## Plots", 1)[0]
    return [line.removeprefix("- ") for line in lines.splitlines()]


def test_run_study_writes_the_commands_files_and_returns_what_it_printed(study, tmp_path):
    """run_study with xent compare's arguments, on a copy of the command's study: every cell is read, not trained
    again; results.csv, summary.csv, the plots and the reports are written again, byte for byte the command's (the
    runs' place in results.csv aside); the rows, summary and findings returned are those the command wrote and
    printed."""
    original, stdout = study
    directory = _copy_without_outputs(original, tmp_path / "copy")
    begun, started, done = [], [], []
    result = run_study("long-tail", out=directory, **STUDY, on_begin=begun.append, on_start=started.append,
                       on_done=lambda cell, row: done.append((cell.directory.name, row)))  # fmt: skip
    assert begun == [result.grid] and result.directory == directory and result.report == directory / "report.html"
    assert started == [0]  # nothing to train
    assert [name for name, _ in done] == ["ce__seed0", "ce__seed1", "la_tau=0.5__seed0", "la_tau=0.5__seed1"]
    assert [row for _, row in done] == list(result.rows)
    assert result.files == tuple(directory / name for name in OUTPUTS) and result.unwritten == ()
    for name in OUTPUTS:
        written, commands = (directory / name).read_bytes(), (original / name).read_bytes()
        if name == "results.csv":
            commands = commands.replace(str(original).encode(), str(directory).encode())
        assert written == commands, name
    for rows, path in ((result.rows, original / "results.csv"), (result.summary, original / "summary.csv")):
        saved = _csv(path)
        assert len(saved) == len(rows) and all(line.pop("study") == "long-tail" for line in saved)
        for row, line in zip(rows, saved, strict=True):
            assert row.keys() == line.keys()
            assert {key: str(value) for key, value in row.items() if key != "run_dir"} == {
                key: value for key, value in line.items() if key != "run_dir"
            }
    assert list(result.findings) == _shown(original / "report.md") and result.findings[-1].startswith("Recommendation")
    printed = " ".join(stdout.split())  # the console wraps long lines
    assert all(" ".join(f"• {sentence}".split()) in printed for sentence in result.findings)


def test_run_study_returns_the_files_it_could_not_write_without_raising(study, tmp_path):
    original, _ = study
    directory = _copy_without_outputs(original, tmp_path / "copy")
    (directory / "report.md").mkdir()  # stands for a read-only file, even for root
    result = run_study(out=directory, **STUDY)
    assert [error.filename for error in result.unwritten] == [str(directory / "report.md")]
    assert directory / "report.md" not in result.files and len(result.files) == len(OUTPUTS) - 1
    assert (directory / "report.html").is_file() and result.findings


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"jobs": 0}, ConfigError, "--jobs must be at least 1, got 0"),
        ({"jobs": 2, "settings": {"workers": 1}}, ConfigError, "--workers 1 starts loader processes"),
        ({"losses": "ce,focal"}, TypeError, "losses must be a sequence of names, e.g. ['ce', 'focal']"),
        ({"seeds": 0}, ConfigError, "--seeds must be at least 1, got 0"),
        ({"settings": {"epochs": 0}}, ConfigError, "--epochs must be at least 1"),
        ({"study": "nope"}, ConfigError, "--study nope unknown"),
    ],
)
def test_run_study_refuses_bad_arguments_before_any_work(arguments, error, message, tmp_path):
    out = tmp_path / "study"
    with pytest.raises(error, match=re.escape(message)):
        run_study(out=out, **arguments)
    with pytest.raises(TypeError, match="out must be a path"):
        run_study(out=3)  # type: ignore[arg-type]
    assert not out.exists()  # nothing was started


# --- the report: leaders paired with each other, ties, a recommendation ------------------------------------------

KEYS = ["accuracy", "balanced_accuracy", "macro_f1", "nll", "ece", "ece_after_ts", "nll_after_ts", "train_seconds"]


def _rows(values: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """Rows of results.csv from (balanced accuracy, NLL) per seed for each loss; the other metrics follow them."""
    rows = []
    for loss, per_seed in values.items():
        for seed, (accuracy, nll) in enumerate(per_seed):
            row = {"loss": loss, "seed": seed, **dict.fromkeys(KEYS, 0.1), "run_dir": f"runs/{loss}__seed{seed}"}
            row |= {"accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": accuracy, "nll": nll,
                    "train_seconds": {"ce": 1.0}.get(loss, 5.0 + seed)}  # fmt: skip
            rows.append(row)
    return rows


# the long-tail study of the issue: cb and la tied on balanced accuracy, la with the clearly better NLL, balanced
# softmax identical to la (τ = 1), cross-entropy behind and the fastest to train
LONG_TAIL = {
    "ce": [(0.70, 0.98), (0.73, 0.95), (0.72, 1.00)],
    "cb": [(0.80, 0.95), (0.77, 0.85), (0.822, 1.05)],
    "la": [(0.79, 0.68), (0.78, 0.60), (0.812, 0.75)],
    "balanced-softmax": [(0.79, 0.68), (0.78, 0.60), (0.812, 0.75)],
}


def _findings(tmp_path: Path, values: dict[str, list[tuple[float, float]]]) -> tuple[list[str], list[str]]:
    from xent.train.findings import findings
    from xent.train.report import _markdown_table

    seeds = len(next(iter(values.values())))
    grid = build_grid(tmp_path / "s", losses=list(values), seeds=seeds, settings=TINY)
    rows = _rows(values)
    summary = aggregate(rows, None)
    return findings(grid, summary, rows), _markdown_table(grid, summary)


def test_the_report_pairs_the_leaders_calls_a_tie_and_recommends_on_calibration_too(tmp_path):
    sentences, table = _findings(tmp_path, LONG_TAIL)
    text = "\n".join(sentences)
    leader = next(s for s in sentences if s.startswith("Top on balanced acc."))
    assert "tie" in leader and "cb" in leader and "la" in leader, leader  # cb − la paired over seeds: within noise
    ranking = next(s for s in sentences if s.startswith("Ranking"))
    assert "cb > la" not in ranking and "cb ≈ la" in ranking and "la = balanced-softmax" in ranking, ranking
    recommendation = sentences[-1]
    assert recommendation.startswith("Recommendation: la"), recommendation  # tied on the metric, better NLL
    assert "NLL" in recommendation
    identical = next(s for s in sentences if "identical" in s)
    assert "balanced-softmax" in identical and "τ = 1" in identical, identical
    assert "train s" not in text and "fastest" not in text
    assert all("**" not in line.split("|")[-2] for line in table[2:])  # training seconds: no best to crown


def test_a_clear_leader_is_recommended_and_two_seeds_are_no_standard_deviation(tmp_path):
    values = {"ce": [(0.70, 0.9), (0.72, 0.9)], "la": [(0.80, 0.7), (0.81, 0.7)], "focal": [(0.71, 0.8), (0.75, 0.8)]}
    sentences, _ = _findings(tmp_path, values)
    text = "\n".join(sentences)
    assert "standard deviation" not in text and "std" not in text and "one std" not in text, text
    leader = next(s for s in sentences if s.startswith("Top on balanced acc."))
    assert leader.startswith("Top on balanced acc.: la") and "tie" not in leader, leader
    assert "2 seeds" in leader  # too few to judge by a spread: says so
    assert sentences[-1].startswith("Recommendation: la"), sentences[-1]
    one_seed, _ = _findings(tmp_path, {loss: per_seed[:1] for loss, per_seed in LONG_TAIL.items()})
    assert "standard deviation of the per-seed" not in "\n".join(one_seed)


def _captured_figures(monkeypatch):
    from xent.train import report

    figures = []
    monkeypatch.setattr(report, "_save", lambda figure, path: figures.append(figure))
    return figures


def test_the_plots_show_the_differences_and_every_loss(tmp_path, monkeypatch):
    from xent.train.report import plot_metrics, plot_per_class

    figures = _captured_figures(monkeypatch)
    summary = aggregate(_rows(LONG_TAIL), None)
    plot_metrics(summary, None, tmp_path / "metrics.png")
    for axis in figures[0].axes:
        bottom, top = axis.get_ylim()
        values = [line for line in axis.get_lines() if len(line.get_ydata())]
        assert bottom > 0, axis.get_title()  # the axis spans the values, not 0 to the values
        assert values and top > bottom
    rows = []
    counts = [100, 40, 40, 40, 10, 10, 2]  # classes with equal training counts
    for loss in ("la", "balanced-softmax"):  # identical results: neither may hide the other
        for seed in (0, 1):
            run = tmp_path / f"{loss}__seed{seed}"
            run.mkdir()
            accuracy = {str(c): round(0.9 - 0.1 * c + 0.05 * seed, 2) for c in range(len(counts))}
            (run / "summary.json").write_text(json.dumps({"class_counts": counts, "test_per_class_accuracy": accuracy}))
            rows.append({"loss": loss, "seed": seed, "run_dir": str(run)})
    plot_per_class(rows, None, tmp_path / "per_class.png")
    lines = [line for line in figures[1].axes[0].get_lines() if line.get_label() in ("la", "balanced-softmax")]
    assert len(lines) == 2
    for line in lines:
        x = list(line.get_xdata())
        assert x == sorted(x) and len(set(x)) == len(x) == 4, x  # one point per count: no vertical zig-zag
    (a, b) = lines
    assert list(a.get_xdata()) != list(b.get_xdata()) or a.get_marker() != b.get_marker()
