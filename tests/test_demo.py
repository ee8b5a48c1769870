"""The command-line entry point's demo. (README's and the docs' code blocks run through Sybil: conftest.py.)"""

import re
import subprocess
import sys

import pytest

import xent


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
