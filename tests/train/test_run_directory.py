"""What a run directory says and guards: its name, the per-epoch line, summary.json's bins, eval's output, the
writer's lock, unique temporary files, and checkpoints that carry the identity of their run.

Two tiny runs are trained once for the module (seconds); a test that changes a run works on a copy.
"""

import io
import itertools
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from xent.train import checkpoint
from xent.train.config import ConfigError, TrainConfig


def _train(directory: Path, **options) -> tuple[dict, str]:
    from xent.train import train

    output = io.StringIO()
    summary = train(TrainConfig(out=str(directory), quiet=True, **options), Console(file=output, width=200))
    return summary, output.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run ``a`` (the default MLP, 3 epochs) and run ``b`` (another model and loss, 1 epoch)."""
    root = tmp_path_factory.mktemp("runs")
    summary, printed = _train(root / "a", epochs=3)
    _train(root / "b", epochs=1, model="linear", loss="focal")
    return {"a": root / "a", "b": root / "b", "summary": summary, "printed": printed}


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy


def _error_line(arguments: list[str], capsys) -> str:
    from xent.cli import main

    status = main(arguments)
    stderr = capsys.readouterr().err
    assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
    return stderr.strip()


# --- item 10: what the run directory and the commands say --------------------------------------------------------


def test_the_default_run_name_says_the_loss_imbalance_and_noise_and_name_sets_it(tmp_path, monkeypatch, capsys):
    from xent.cli import main

    monkeypatch.chdir(tmp_path)
    quick = ["--epochs", "1", "--quiet", "--model", "linear"]
    assert main(["train", "--loss", "focal", "--imbalance-ratio", "10", "--label-noise", "0.2", *quick]) == 0
    (made,) = (tmp_path / "runs").iterdir()
    assert made.name.endswith("-digits-linear-focal-imbalance10-noise0.2"), made.name
    assert main(["train", "--name", "my-study", *quick]) == 0
    assert (tmp_path / "runs" / "my-study" / "summary.json").is_file()
    capsys.readouterr()
    line = _error_line(["train", "--name", "my-study", *quick], capsys)
    assert "runs/my-study already holds a run" in line and "--resume runs/my-study" in line
    line = _error_line(["train", "--name", "x", "--out", str(tmp_path / "y"), *quick], capsys)
    assert line == "xent train: error: give --out or --name, not both"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--loss", "ce", "--gamma", "3"], "--gamma is not read by --loss ce; it is read by: focal"),
        (["--gamma", "2.0"], "--gamma is not read by --loss ce; it is read by: focal"),  # the default value, given
        (["--loss", "focal", "--label-smoothing", "0.1"],
         "--label-smoothing is not read by --loss focal; it is read by: ce, bce, cb, la, balanced-softmax, poly1"),
        (["--loss", "mse", "--drw-epoch", "1"], "--drw-epoch is not read by --loss mse; it is read by: ldam-drw"),
    ],
)  # fmt: skip
def test_a_flag_the_chosen_loss_does_not_read_is_refused(arguments, message, tmp_path, capsys):
    line = _error_line(["train", "--out", str(tmp_path / "run"), *arguments], capsys)
    assert line == f"xent train: error: {message}"
    assert not (tmp_path / "run").exists()


def test_flags_left_at_their_defaults_are_not_counted_as_given(tmp_path, capsys):
    line = _error_line(["train", "--out", str(tmp_path / "run"), "--loss", "focal", "--epochs", "0"], capsys)
    assert line == "xent train: error: --epochs must be at least 1, got 0"


def test_the_epoch_line_shows_what_chooses_the_best_epoch(runs):
    lines = [line for line in runs["printed"].splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3
    for line in lines:
        assert re.search(r"val acc \d+\.\d\d%", line), line
    best = [int(line.split()[1].split("/")[0]) for line in lines if "(best)" in line]
    assert best and best[0] == 1 and best[-1] == runs["summary"]["best_epoch"]
    assert "best epoch: highest validation accuracy, then lowest validation loss" in runs["printed"]


def test_summary_reliability_bins_are_labelled(runs):
    summary = json.loads((runs["a"] / "summary.json").read_text())
    bins = summary["test_reliability_bins"]
    assert [set(b) for b in bins] == [{"lower", "upper", "count", "confidence", "accuracy"}] * len(bins)
    assert bins[0]["lower"] == 0.0 and bins[-1]["upper"] == 1.0
    assert all(a["upper"] == b["lower"] for a, b in itertools.pairwise(bins))
    assert all((b["count"] == 0) == (b["confidence"] is None) == (b["accuracy"] is None) for b in bins)
    assert all(b["lower"] - 1e-6 <= b["confidence"] <= b["upper"] + 1e-6 for b in bins if b["count"])
    correct = sum(b["accuracy"] * b["count"] for b in bins if b["count"])
    assert correct / sum(b["count"] for b in bins) == pytest.approx(summary["test_accuracy"])


def test_eval_json_prints_the_result_and_saves_the_fitted_temperature(runs, tmp_path, capsys):
    from xent.cli import main

    run = _copy(runs["a"], tmp_path)
    assert main(["eval", str(run), "--json", "--temperature-scale"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(runs["summary"]["test_accuracy"]) and result["temperature"] > 0
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["temperature"] == result["temperature"] and saved["epoch"] == result["epoch"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# --- item 11: one writer per run directory ------------------------------------------------------------------------


def test_a_second_writer_is_refused_in_one_line_naming_the_holder(runs, tmp_path, capsys):
    from xent.train.loop import prepare

    run_dir = _copy(runs["a"], tmp_path)
    holder = prepare(TrainConfig(resume=str(run_dir), quiet=True))
    try:
        with pytest.raises(ConfigError, match=rf"{run_dir} is in use by process {os.getpid()} \(.+\)"):
            prepare(TrainConfig(resume=str(run_dir), quiet=True))
        with pytest.raises(ConfigError, match=rf"in use by process {os.getpid()}"):
            prepare(TrainConfig(out=str(run_dir), quiet=True, epochs=1))
        line = _error_line(["train", "--resume", str(run_dir)], capsys)
        assert line.startswith(f"xent train: error: --resume {run_dir}: {run_dir} is in use by process {os.getpid()}")
    finally:
        holder.lock.release()
    prepare(TrainConfig(resume=str(run_dir), quiet=True)).lock.release()  # free again


def test_temporary_files_are_unique_per_writer(tmp_path, capsys):
    """Another writer's temporary file (here one that cannot be replaced: a directory) is not this writer's."""
    from xent.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in (".metrics.csv.tmp", ".summary.json.tmp"):
        (run_dir / name).mkdir()
    assert main(["train", "--out", str(run_dir), "--epochs", "1", "--quiet"]) == 0, capsys.readouterr().err
    assert (run_dir / "metrics.csv").is_file() and (run_dir / ".metrics.csv.tmp").is_dir()


# --- item 12: a checkpoint knows its run --------------------------------------------------------------------------


def test_a_checkpoint_carries_the_identity_of_its_run(runs):
    from xent.train.config import resolve, run_identity

    config = resolve(TrainConfig.from_dict(json.loads((runs["a"] / "config.json").read_text())))
    for name in (checkpoint.LAST, checkpoint.BEST):
        state = torch.load(runs["a"] / name, weights_only=True)
        assert state["run"] == run_identity(config)
        assert state["format"] == checkpoint.FORMAT


def test_eval_of_a_best_checkpoint_of_another_run_names_the_file(runs, tmp_path):
    from xent.train.evaluate import evaluate_run

    run_dir = _copy(runs["a"], tmp_path)
    shutil.copy(runs["b"] / checkpoint.BEST, run_dir / checkpoint.BEST)
    with pytest.raises(ConfigError) as caught:
        evaluate_run(run_dir)
    message = str(caught.value)
    assert message.startswith(f"{run_dir / checkpoint.BEST} belongs to another run"), message
    assert "model linear" in message and "--data" not in message


@pytest.mark.parametrize("name", [checkpoint.LAST, checkpoint.BEST])
def test_resume_with_a_checkpoint_of_another_run_is_refused_up_front(runs, tmp_path, name):
    from xent.train.loop import prepare

    run_dir = _copy(runs["a"], tmp_path)
    shutil.copy(runs["b"] / name, run_dir / name)
    with pytest.raises(ConfigError) as caught:
        prepare(TrainConfig(resume=str(run_dir), quiet=True))
    message = str(caught.value)
    assert message.startswith(f"--resume {run_dir}: {run_dir / name} belongs to another run"), message


@pytest.mark.parametrize("key", [b"sha256", b"train_seconds", b"best_val"])
def test_a_flipped_byte_in_a_key_name_is_damage_not_a_legacy_file(runs, tmp_path, key):
    data = (runs["a"] / checkpoint.LAST).read_bytes()
    assert data.count(key) == 1
    at = data.index(key)
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(data[: at + 2] + bytes([data[at + 2] ^ 0x01]) + data[at + 3 :])
    with pytest.raises(checkpoint.CheckpointError, match=rf"{flipped} is corrupted"):
        checkpoint.load(flipped)


def test_a_checkpoint_written_before_digests_still_loads(runs, tmp_path):
    state = torch.load(runs["a"] / checkpoint.LAST, weights_only=True)
    legacy = tmp_path / "legacy.pt"
    torch.save({key: state[key] for key in checkpoint.KEYS}, legacy)
    assert checkpoint.load(legacy)["epoch"] == state["epoch"]
