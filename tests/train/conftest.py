import subprocess
import sys

import pytest


def run_xent(*arguments: str, timeout: float = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``python -m xent ARGS`` as a user would run it; returns the finished process."""
    result = subprocess.run(
        [sys.executable, "-m", "xent", *arguments], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"xent {' '.join(arguments)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def xent_cli():
    return run_xent
