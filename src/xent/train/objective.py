"""The training criterion named by ``--loss``: its entry of :data:`xent.train.losses.LOSSES`, built from the
training split's class counts."""

from __future__ import annotations

import torch

from xent.train.config import ConfigError, TrainConfig
from xent.train.data import DataBundle
from xent.train.losses import LOSSES, Criterion

__all__ = ["Criterion", "build_criterion"]


def _check_every_class_trains(loss: str, data: DataBundle) -> None:
    """A loss built from class counts needs every class in the training split; the library rejects a zero count,
    and here the error names the flag and the class instead."""
    counts = data.class_counts()
    if LOSSES[loss].counted and not bool((counts > 0).all()):
        name = data.class_names[int(torch.nonzero(counts == 0)[0])]
        raise ConfigError(
            f"--loss {loss} uses the training split's class counts, and class {name!r} has no training example "
            f"(class counts {counts.tolist()}); give it more examples or a smaller --val-fraction, or leave it out "
            "with --classes"
        )


def build_criterion(config: TrainConfig, data: DataBundle) -> Criterion:
    """``criterion(logits (B, C), target (B,), epoch, reduction)`` for the configured loss and training split."""
    _check_every_class_trains(config.loss, data)
    return LOSSES[config.loss].build(config, data.class_counts().double())
