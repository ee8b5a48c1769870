"""xent train / xent eval end to end, as a user runs them: tiny settings, seconds each."""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.conftest import run_xent
from tests.train.test_data import make_cifar, make_folder, make_mnist
from xent.train import checkpoint

SUMMARY_KEYS = {"test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_nll", "test_ece",
                "epochs_completed", "train_seconds"}  # fmt: skip
QUICK = ("--epochs", "3", "--quiet")


def test_default_run_writes_the_whole_run_directory(tmp_path):
    out = tmp_path / "run"
    result = run_xent("train", "--out", str(out), *QUICK)
    assert "epoch   3/3" in result.stdout and "best epoch" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS and summary["epochs_completed"] == 3
    assert summary["test_accuracy"] > 0.8  # three epochs of the default MLP on digits
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "mlp" and config["optimizer"] == "adam"  # digits' resolved defaults
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert {"train_loss", "val_loss", "test_loss", "test_accuracy", "test_balanced_accuracy", "seconds"} <= set(rows[0])
    for picture in ("curves.png", "confusion.png", "reliability.png"):
        assert (out / "plots" / picture).read_bytes()[:4] == b"\x89PNG"
    state = torch.load(out / checkpoint.LAST, weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "rng"} <= set(state) and state["epoch"] == 3
    assert (out / checkpoint.BEST).is_file()


def test_test_loss_is_averaged_over_examples_not_batches(tmp_path):
    """With a batch size that leaves a small last batch, the mean of batch means would differ."""
    from xent.train.config import TrainConfig, resolve
    from xent.train.data import as_float, load_data
    from xent.train.loop import evaluate
    from xent.train.models import build_model
    from xent.train.objective import build_criterion
    from xent.train.runtime import Runtime

    config = resolve(TrainConfig())
    bundle = load_data(config)
    torch.manual_seed(0)
    model = build_model("mlp", bundle.input_shape, bundle.num_classes)
    criterion = build_criterion(config, bundle)
    metrics = evaluate(model, bundle.test, criterion, 0, Runtime(torch.device("cpu")), 100, bundle.num_classes)
    with torch.no_grad():
        logits = model(as_float(bundle.test.x))
    expected = torch.nn.functional.cross_entropy(logits, bundle.test.y).item()
    assert metrics.loss == pytest.approx(expected, rel=1e-5)
    assert metrics.nll == pytest.approx(expected, rel=1e-5)
    assert metrics.accuracy == pytest.approx((logits.argmax(1) == bundle.test.y).float().mean().item())


def _train_in_process(**options) -> dict:
    """The library call behind ``xent train`` (no interpreter start-up: these tests cover options, not the CLI)."""
    from rich.console import Console

    from xent.train import TrainConfig, train

    return train(TrainConfig(quiet=True, **options), Console(file=io.StringIO()))


@pytest.mark.parametrize(
    "options",
    [
        {"classes": "0,1", "loss": "bce", "optimizer": "sgd", "nesterov": True, "schedule": "step"},
        {"imbalance_ratio": 10.0, "loss": "cb", "optimizer": "nadam", "warmup_epochs": 1},
        {"imbalance_ratio": 10.0, "loss": "ldam-drw", "drw_epoch": 1, "schedule": "onecycle"},
        {"imbalance_ratio": 5.0, "loss": "la", "model": "linear", "grad_clip": 1.0},
        {"label_noise": 0.3, "loss": "gce", "model": "cnn", "augment": "flip,rotate,crop"},
        {"loss": "sce", "amp": True, "optimizer": "adamw"},
        {"loss": "focal", "gamma": 1.0, "model": "resnet20", "batch_size": 256},
        {"loss": "poly1", "label_smoothing": 0.1, "workers": 1},
        {"loss": "balanced-softmax", "val_fraction": 0.0},
    ],
)
def test_options_train_end_to_end(tmp_path, options):
    summary = _train_in_process(out=str(tmp_path / "run"), epochs=2, **options)
    assert summary["epochs_completed"] == 2 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["test_nll"] == summary["test_nll"]  # finite, not NaN


@pytest.mark.parametrize("data_set", ["mnist", "fashion-mnist", "cifar10", "folder"])
def test_every_data_format_trains(tmp_path, data_set):
    directory = tmp_path / "data"
    if data_set == "cifar10":
        make_cifar(directory)
    elif data_set == "folder":
        from PIL import Image

        for label in ("a", "b", "c"):
            (directory / label).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (16, 16), (40 * i, 80 * "abc".index(label), 20)).save(directory / label / f"{i}.png")
    else:
        make_mnist(directory, compress=data_set == "mnist")
    source = {"data": f"folder:{directory}"} if data_set == "folder" else {"data": data_set, "data_dir": str(directory)}
    summary = _train_in_process(**source, out=str(tmp_path / "run"), epochs=1, batch_size=16, model="cnn")
    assert summary["epochs_completed"] == 1
    assert sum(summary["class_counts"]) == summary["train_examples"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--warmup-epochs", "30", "--epochs", "20"), "--warmup-epochs 30 must be smaller than --epochs 20"),
        (("--loss", "hinge"), "--loss hinge unknown; choose from ce, mse, bce"),
        (("--model", "vit"), "--model vit unknown; choose from linear, mlp, cnn, resnet20"),
        (("--optimizer", "lion"), "--optimizer lion unknown; choose from sgd, adam"),
        (("--data", "imagenet"), "--data imagenet unknown; choose from digits"),
        (("--classes", "0,10"), "--classes 10 out of range: --data digits has classes 0-9"),
        (("--imbalance-ratio", "0.5"), "--imbalance-ratio must be at least 1, got 0.5"),
        (("--label-noise", "1.0"), "--label-noise must be in [0, 1), got 1.0"),
        (("--data", "mnist", "--data-dir", "/nonexistent"), "not found: --data mnist needs the four IDX files"),
        (("--data", "folder:/nonexistent"), "--data folder:/nonexistent: /nonexistent does not exist"),
        (("--resume", "/nonexistent-run"), "--resume /nonexistent-run: no checkpoint"),
        (("--augment", "flip", "--data", "mnist1d"), "--augment flip needs image data"),
        (("--lr", "abc"), "argument --lr: invalid float value: 'abc'"),
    ],
)
def test_configuration_errors_are_one_line_naming_the_flag(arguments, message, tmp_path, capsys):
    from xent.cli import main

    try:
        status = main(["train", "--out", str(tmp_path / "run"), *arguments])
    except SystemExit as exit:  # argparse's own errors (a value of the wrong type)
        status = exit.code
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    last_line = stderr.strip().splitlines()[-1]  # argparse prints its usage above
    assert last_line.startswith("xent train: error: ") and message in last_line
    assert not (tmp_path / "run" / checkpoint.LAST).exists()  # no work started


def _error_line(arguments: list[str], capsys) -> str:
    """The one line ``xent ARGS`` prints on stderr when it stops with exit status 2."""
    from xent.cli import main

    status = main(arguments)
    stderr = capsys.readouterr().err
    assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
    return stderr.strip()


def test_a_class_without_examples_stops_training_in_one_line(tmp_path, capsys):
    images = tmp_path / "images"
    make_folder(images, {"a": 1, "b": 10, "c": 10})
    (images / "d").mkdir()
    line = _error_line(["train", "--data", f"folder:{images}", "--out", str(tmp_path / "run")], capsys)
    assert line == (f"xent train: error: --data folder:{images}: class folder {images / 'd'} holds no PNG/JPEG "
                    "image; add images or remove it")  # fmt: skip
    (images / "d").rmdir()
    # Class a's one image is in the training split; --val-fraction 0.9 moves it to validation. Cross-entropy trains
    # without it, a loss built from the class counts cannot.
    for loss in ("la", "cb", "balanced-softmax", "ldam-drw"):
        line = _error_line(["train", "--data", f"folder:{images}", "--val-fraction", "0.9", "--loss", loss,
                            "--out", str(tmp_path / "run")], capsys)  # fmt: skip
        assert line.startswith(f"xent train: error: --loss {loss} uses the training split's class counts, and "
                               "class 'a' has no training example (class counts [0, 1, 1])")  # fmt: skip
    assert not (tmp_path / "run" / checkpoint.LAST).exists()


def test_a_class_without_test_examples_has_no_accuracy_anywhere(tmp_path, capsys):
    """Class a's two images both go to training (20 % of 2 rounds to 0): its test accuracy is n/a, not 0 %."""
    from xent.cli import main

    images, out = tmp_path / "images", tmp_path / "run"
    make_folder(images, {"a": 2, "b": 10, "c": 10})
    assert main(["train", "--data", f"folder:{images}", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    assert "no test example of class 'a': its accuracy is n/a" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    per_class = summary["test_per_class_accuracy"]
    assert per_class["a"] is None and {per_class["b"], per_class["c"]} <= {0.0, 0.5, 1.0}
    assert summary["test_balanced_accuracy"] == pytest.approx((per_class["b"] + per_class["c"]) / 2)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert float(rows[-1]["test_balanced_accuracy"]) == pytest.approx(summary["test_balanced_accuracy"])
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy of class a │ n/a (no test example)" in printed
    assert re.search(rf"accuracy of class b │ +{100 * per_class['b']:.2f}% │", printed)


def test_a_configuration_error_in_a_real_process_has_no_traceback(tmp_path):
    result = run_xent("train", "--out", str(tmp_path / "run"), "--epochs", "0", check=False)
    assert result.returncode == 2 and result.stderr.strip() == "xent train: error: --epochs must be at least 1, got 0"


def test_diverging_loss_stops_with_epoch_and_batch(tmp_path):
    out = tmp_path / "run"
    result = run_xent("train", "--out", str(out), "--epochs", "3", "--lr", "1e30", "--optimizer", "sgd", "--quiet",
                      check=False)  # fmt: skip
    assert result.returncode == 3
    assert "the training loss is" in result.stderr and "at epoch" in result.stderr and ", batch " in result.stderr
    assert "Traceback" not in result.stderr


def _final_metrics(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "metrics.csv").open()))


def test_resume_after_kill_ends_exactly_like_an_uninterrupted_run(tmp_path):
    arguments = ("--epochs", "6", "--quiet", "--augment", "flip,crop", "--model", "cnn", "--batch-size", "32")
    reference = tmp_path / "reference"
    run_xent("train", "--out", str(reference), *arguments)

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "xent", "train", "--out", str(killed), *arguments],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill -9 once two epochs are done, mid-way through the third
        if (killed / "metrics.csv").exists() and len(_final_metrics(killed)) >= 2:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    completed = torch.load(killed / checkpoint.LAST, weights_only=True)["epoch"]
    assert 2 <= completed < 6

    result = run_xent("train", "--resume", str(killed), "--quiet")
    assert f"resuming {killed} after epoch {completed}" in result.stdout
    resumed_rows, reference_rows = _final_metrics(killed), _final_metrics(reference)
    drop = {"seconds"}
    assert [{k: v for k, v in row.items() if k not in drop} for row in resumed_rows] == [
        {k: v for k, v in row.items() if k not in drop} for row in reference_rows
    ]
    resumed, uninterrupted = (json.loads((d / "summary.json").read_text()) for d in (killed, reference))
    for key in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_nll", "test_ece", "best_epoch"):
        assert resumed[key] == uninterrupted[key]


def test_eval_with_temperature_scaling(tmp_path):
    out = tmp_path / "run"
    run_xent("train", "--out", str(out), "--epochs", "5", "--quiet")
    result = run_xent("eval", str(out), "--temperature-scale")
    summary = json.loads((out / "summary.json").read_text())
    assert f"{100 * summary['test_accuracy']:.2f}%" in result.stdout  # the same best checkpoint
    assert "fitted temperature" in result.stdout and "ECE before → after" in result.stdout
    from xent.train.evaluate import evaluate_run

    scaled = evaluate_run(out, temperature_scale=True)
    assert scaled["temperature"] > 0
    assert scaled["nll_after"] <= scaled["nll_before"] + 0.05  # fitted on validation, measured on test
    assert ("ECE rose:" in result.stdout) == (scaled["ece_after"] > scaled["ece_before"])
    missing = run_xent("eval", str(tmp_path / "nothing"), check=False)
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr


@pytest.mark.parametrize(("ece_before", "ece_after"), [(0.0106, 0.0328), (0.0328, 0.0106)])
def test_eval_says_why_temperature_scaling_can_raise_ece(ece_before, ece_after, monkeypatch, capsys):
    """The temperature minimises the validation NLL, not ECE: when ECE rises, one line says so."""
    from xent.cli import main
    from xent.train import evaluate

    result = {"run_dir": "run", "epoch": 5, "data": "digits", "accuracy": 0.97, "balanced_accuracy": 0.97,
              "macro_f1": 0.97, "nll": 0.1, "ece": ece_before, "brier": 0.05, "loss": 0.1, "per_class_accuracy": {},
              "temperature": 0.9, "nll_before": 0.1, "nll_after": 0.09, "ece_before": ece_before,
              "ece_after": ece_after}  # fmt: skip
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *args, **kwargs: result)
    assert main(["eval", "run", "--temperature-scale"]) == 0
    printed = capsys.readouterr().out
    assert f"{ece_before:.4f} → {ece_after:.4f}" in printed
    note = "ECE rose: the temperature minimises NLL on the validation split, not ECE"
    assert (note in printed) == (ece_after > ece_before)


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "xent", "train",
         "--out", str(out), "--epochs", "2", "--quiet"],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch   2/2") == 1  # only rank 0 reports and writes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["test_accuracy"] > 0.5


def test_log_interval_prints_the_running_loss_when_not_on_a_terminal(tmp_path):
    result = run_xent("train", "--out", str(tmp_path / "run"), "--epochs", "1", "--log-interval", "5")
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch 1 batch ")]
    assert lines[0].startswith("epoch 1 batch 5/") and "loss " in lines[0] and "samples/s" in lines[0]
    assert len(lines) >= 4  # every 5 batches, and the last one


@pytest.mark.parametrize("damage", ["truncated", "flipped bytes", "not a checkpoint"])
def test_resume_from_a_damaged_checkpoint_says_so_in_one_line_and_keeps_it(tmp_path, damage):
    out = tmp_path / "run"
    run_xent("train", "--out", str(out), "--epochs", "2", "--quiet")
    last = out / checkpoint.LAST
    data = last.read_bytes()
    if damage == "truncated":
        last.write_bytes(data[: len(data) // 2])
    elif damage == "flipped bytes":
        last.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:2000]) + data[2000:])
    else:
        torch.save({"weights": torch.zeros(3)}, last)
    damaged = last.read_bytes()
    result = run_xent("train", "--resume", str(out), "--epochs", "3", "--quiet", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert str(last) in lines[0] and f"{out / checkpoint.BEST} is intact" in lines[0] and "--out" in lines[0]
    assert last.read_bytes() == damaged  # the evidence is kept
    # xent eval reads best.pt; damaged, it is named in one line too
    (out / checkpoint.BEST).write_bytes(b"not a checkpoint")
    result = run_xent("eval", str(out), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "best.pt is unreadable" in result.stderr


def test_ctrl_c_and_an_unwritable_run_directory_end_in_one_line(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "xent", "train", "--out", str(out), "--epochs", "500", "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out / checkpoint.LAST).exists():
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [f"xent train: interrupted; continue with: xent train --resume {out}"]
    assert (out / checkpoint.LAST).is_file()

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_xent("train", "--out", str(blocker / "run"), "--epochs", "1", "--quiet", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"xent train: error: cannot write the run: {blocker / 'run'}: "
                                                  "Not a directory"]  # fmt: skip
