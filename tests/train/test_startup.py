"""Start-up: what `xent train` imports before it trains, and the digits data read without scikit-learn."""

import json
import subprocess
import sys

import numpy as np

HEAVY = ("matplotlib", "torchmetrics", "sklearn", "scipy", "kornia")


def _modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nimport json\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_the_trainer_and_its_digits_data_import_no_plotting_or_metrics_library(tmp_path):
    """Everything `xent train` runs before its first epoch: the CLI, the loop, a run prepared on digits."""
    code = f"""
import xent.cli, xent.train.loop
from xent.train import TrainConfig
from xent.train.loop import prepare
run = prepare(TrainConfig(out={str(tmp_path / "run")!r}, epochs=1, quiet=True))
run.lock.release()
"""
    loaded = _modules_after(code)
    assert not [name for name in loaded if name.split(".")[0] in HEAVY]


def test_the_digits_are_scikit_learns():
    from sklearn.datasets import load_digits

    from xent.train.data import digits_array

    array, digits = digits_array(), load_digits()
    assert np.array_equal(array[:, :-1], digits.data) and np.array_equal(array[:, -1], digits.target)
