"""The trainer behind ``xent train``, ``xent eval`` and ``xent compare``: config, data, models, loop, metrics,
checkpoints, plots — and loss studies (:func:`run_study`), trained with the same loop.

The configuration is imported eagerly and the loop and the study on first use, so that ``xent --help`` and a bad flag
answer at once; the loop itself imports matplotlib only to draw its plots after training, and kornia only for
``--augment``.
"""

from typing import TYPE_CHECKING

from xent.train.config import ConfigError, TrainConfig, resolve

if TYPE_CHECKING:
    from xent.train.compare import StudyResult, run_study
    from xent.train.loop import Interrupted, TrainingDiverged, train
    from xent.train.study import Cell, Grid, Variant

__all__ = [
    "Cell",
    "ConfigError",
    "Grid",
    "Interrupted",
    "StudyResult",
    "TrainConfig",
    "TrainingDiverged",
    "Variant",
    "resolve",
    "run_study",
    "train",
]

# name -> the module that defines it, imported at the first use of the name
_LAZY = {
    "Interrupted": "loop",
    "TrainingDiverged": "loop",
    "train": "loop",
    "StudyResult": "compare",
    "run_study": "compare",
    "Cell": "study",
    "Grid": "study",
    "Variant": "study",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"xent.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'xent.train' has no attribute {name!r}")
