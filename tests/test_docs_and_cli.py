"""The README's code runs, and so does the command-line entry point."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import xent

ROOT = Path(__file__).resolve().parents[1]


def _readme_python_blocks() -> list:
    """Each ```python block of README.md, named by the line its code starts on."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL):
        line = text.count("\n", 0, match.start(1)) + 1
        blocks.append(pytest.param(line, match.group(1), id=f"README.md line {line}"))
    assert blocks, "README has no python example"
    return blocks


@pytest.mark.parametrize(("line", "block"), _readme_python_blocks())
def test_each_readme_python_block_runs_on_its_own(line, block):
    """In a fresh namespace, as a reader who copies that one block runs it: every block brings its own imports."""
    exec(compile("\n" * (line - 1) + block, "README.md", "exec"), {})  # a traceback shows README's line numbers


def test_python_m_xent_prints_version_and_example():
    result = subprocess.run([sys.executable, "-m", "xent"], capture_output=True, text=True, check=True)
    assert f"xent {xent.__version__}" in result.stdout
    assert "every target ignored                   = 0.000000" in result.stdout
    assert "gradient finite at ±1e4 logits         : True" in result.stdout
    # The float32 values may differ in their last digits; the demo says by how much and against what tolerance.
    ours, theirs = map(float, re.search(r"cross_entropy += (\S+) +\(torch: (\S+)\)", result.stdout).groups())
    shown = re.search(r"relative difference from torch +: loss (\S+), gradient (\S+) \(within the float32 "
                      r"tolerance 2e-05\)", result.stdout)  # fmt: skip
    assert shown, result.stdout
    assert float(shown[1]) == pytest.approx(abs(ours - theirs) / abs(theirs), rel=0.1, abs=1e-9)
    assert max(float(shown[1]), float(shown[2])) <= 2e-5
