"""The README's code runs, and so does the command-line entry point."""

import re
import subprocess
import sys
from pathlib import Path

import xent

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert blocks, "README has no python example"
    namespace: dict = {}  # one namespace, as a reader runs the examples top to bottom
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_python_m_xent_prints_version_and_example():
    result = subprocess.run([sys.executable, "-m", "xent"], capture_output=True, text=True, check=True)
    assert f"xent {xent.__version__}" in result.stdout
    assert "every target ignored                   = 0.000000" in result.stdout
    assert "gradient finite at ±1e4 logits         : True" in result.stdout
