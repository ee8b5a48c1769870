"""The runnable examples train briefly and write their sample grids, or print their summary."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("example", ["gan.py", "vae.py"])
def test_example_runs_one_short_epoch(example, tmp_path):
    out = tmp_path / "samples.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "epoch   1" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("example", ["gan.py", "vae.py"])
def test_example_stopped_by_ctrl_c_leaves_its_last_sample_grid(example, tmp_path):
    out = tmp_path / "samples.png"
    command = [sys.executable, str(ROOT / "examples" / example), "--epochs", "100000", "--save-every", "1"]
    process = subprocess.Popen(
        [*command, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not out.exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "epoch   1  " in stdout and f"saved {out} (epoch 1)" in stdout
    assert re.search(rf"interrupted in epoch \d+; {re.escape(str(out))} holds the samples of epoch \d+", stdout)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # saved atomically: never a half-written file


@pytest.mark.parametrize("loss", ["xent", "no-xent"])
def test_lm_example_trains_a_few_steps(loss, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    flags = ["--no-xent"] if loss == "no-xent" else []
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lm.py"), "--quick", "--out", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        # One thread: as fast for so small a model, and not slowed many times over when the other cores are busy.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "epoch   2" in result.stdout
    assert f"summary ({loss}): final train loss" in result.stdout
    assert (tmp_path / "tokenizer-512.json").exists()


def test_vocab_parallel_example_matches_one_process():
    """torchrun, 2 gloo ranks, an unevenly split vocabulary: the loss curve of one process, to float32 rounding."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*torchrun, str(ROOT / "examples" / "vocab_parallel.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "vocabulary 1,009 split [505, 504]" in result.stdout
    difference = float(result.stdout.split("largest difference ")[1].split()[0])
    assert difference < 1e-4


def test_distill_example_trains_teacher_and_students():
    pytest.importorskip("transformers")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "distill.py"), "--quick", "--divergence", "jsd"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "student, distilled   step    8" in result.stdout
    scores = re.search(r"teacher (\S+), distilled (\S+), from bytes (\S+)$", result.stdout.strip())
    assert scores and all(0 < float(score) < 6 for score in scores.groups())


@pytest.mark.parametrize("loss", ["xent", "no-xent"])
def test_grpo_example_runs_a_few_steps(loss, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out = tmp_path / "reward.png"
    flags = ["--no-xent"] if loss == "no-xent" else []
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "grpo.py"), "--quick", "--out", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "step   10  reward" in result.stdout
    rewards = re.search(rf"summary \({loss}\): reward (\S+) → (\S+) ", result.stdout)
    assert rewards and all(0 <= float(value) <= 1 for value in rewards.groups())
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
