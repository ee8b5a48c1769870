"""The trainer behind ``xent train`` and ``xent eval``: config, data, models, loop, metrics, checkpoints, plots.

The configuration is imported eagerly and the loop on first use, so that ``xent --help`` and a bad flag answer at
once; the loop itself imports matplotlib only to draw its plots after training, and kornia only for ``--augment``.
"""

from typing import TYPE_CHECKING

from xent.train.config import ConfigError, TrainConfig, resolve

if TYPE_CHECKING:
    from xent.train.loop import Interrupted, TrainingDiverged, train

__all__ = ["ConfigError", "Interrupted", "TrainConfig", "TrainingDiverged", "resolve", "train"]


def __getattr__(name: str) -> object:
    if name in ("Interrupted", "TrainingDiverged", "train"):
        from xent.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'xent.train' has no attribute {name!r}")
