"""The trainer behind ``xent train`` and ``xent eval``: config, data, models, loop, metrics, checkpoints, plots."""

from xent.train.config import ConfigError, TrainConfig, resolve
from xent.train.loop import TrainingDiverged, train

__all__ = ["ConfigError", "TrainConfig", "TrainingDiverged", "resolve", "train"]
