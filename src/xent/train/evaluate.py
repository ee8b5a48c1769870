"""``xent eval``: reload a run's best checkpoint, print its metrics, optionally calibrate it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch

import xent
from xent.train import checkpoint
from xent.train.config import ConfigError, TrainConfig, resolve, run_identity
from xent.train.data import Split, as_float, load_data
from xent.train.loop import evaluate
from xent.train.losses import LOSSES
from xent.train.metrics import Metrics, expected_calibration_error
from xent.train.models import build_model
from xent.train.objective import build_criterion
from xent.train.runtime import Runtime


@torch.no_grad()
def _logits(model: torch.nn.Module, split: Split) -> torch.Tensor:
    model.eval()
    return torch.cat([model(as_float(x)).float() for x in split.x.split(512)])


def evaluate_run(run_dir: Path, *, data: str | None = None, data_dir: str | None = None,
                 temperature_scale: bool = False) -> dict[str, Any]:  # fmt: skip
    """The test metrics of ``run_dir``'s best checkpoint, on its own data or on ``data``/``data_dir``.

    With ``temperature_scale`` a temperature is fitted on the validation split (:func:`xent.fit_temperature`) and
    the test NLL and ECE are reported before and after dividing the logits by it; the temperature and those numbers
    are saved to the run directory's ``calibration.json``.
    """
    best = run_dir / checkpoint.BEST
    if not best.is_file():
        raise ConfigError(f"{run_dir}: no checkpoint {best} (is it a run directory of xent train?)")
    saved = TrainConfig.saved(run_dir, "xent eval")
    own = resolve(TrainConfig.from_dict({**saved, "resume": None}))
    # a best.pt of another run is named before any data is read; --data is blamed only when it is the difference
    state = checkpoint.load(best, run=run_identity(own))
    overrides = {key: value for key, value in (("data", data), ("data_dir", data_dir)) if value is not None}
    config = resolve(TrainConfig.from_dict({**saved, **overrides, "resume": None}))
    bundle = load_data(config)
    model = build_model(  # resolve() has set the model and the batch size
        cast(str, config.model), bundle.input_shape, bundle.num_classes, cosine_scale=LOSSES[config.loss].cosine_scale
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        if data is not None:
            raise ConfigError(
                f"--data {config.data} does not fit the model of {run_dir} (different shape or classes)"
            ) from None
        raise ConfigError(  # a checkpoint written before run identities
            f"{best} does not hold the model {run_dir / 'config.json'} describes (model {config.model}, data "
            f"{config.data}): it belongs to another run"
        ) from None
    criterion = build_criterion(config, bundle)
    metrics = evaluate(model, bundle.test, criterion, state["epoch"], Runtime(torch.device("cpu")),
                       cast(int, config.batch_size), bundle.num_classes)  # fmt: skip
    metrics = cast(Metrics, metrics)  # the test split is never empty
    result = {"run_dir": str(run_dir), "epoch": state["epoch"], "data": config.data, **metrics.headline(),
              "per_class_accuracy": dict(zip(bundle.class_names, metrics.per_class_accuracy, strict=True))}  # fmt: skip
    if temperature_scale:
        if len(bundle.val) == 0:
            raise ConfigError(
                "--temperature-scale fits on the validation split, and this run has none (--val-fraction 0)"
            )
        temperature = float(xent.fit_temperature(_logits(model, bundle.val), bundle.val.y))
        test_logits = _logits(model, bundle.test)
        nll = torch.nn.functional.cross_entropy
        result["temperature"] = temperature
        result["nll_before"] = float(nll(test_logits, bundle.test.y))
        result["nll_after"] = float(nll(test_logits / temperature, bundle.test.y))
        result["ece_before"] = expected_calibration_error(test_logits, bundle.test.y)
        result["ece_after"] = expected_calibration_error(test_logits / temperature, bundle.test.y)
        keys = ("temperature", "nll_before", "nll_after", "ece_before", "ece_after", "epoch", "data")
        calibration = {key: result[key] for key in keys}
        checkpoint.write_atomic(run_dir / CALIBRATION, json.dumps(calibration, indent=2) + "\n")
    return result


CALIBRATION = "calibration.json"  # what --temperature-scale fitted: the temperature, test NLL and ECE around it
