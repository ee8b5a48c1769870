"""The runnable examples train briefly and write their sample grids."""

import subprocess
import sys
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
