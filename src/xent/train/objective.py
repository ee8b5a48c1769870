"""The training criterion named by ``--loss``, built from the library's losses and the training split's counts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import xent
from xent.train.config import ConfigError, TrainConfig
from xent.train.data import DataBundle

Criterion = Callable[[torch.Tensor, torch.Tensor, int, str], torch.Tensor]  # (logits, target, epoch, reduction)
COUNTED_LOSSES = ("cb", "la", "balanced-softmax", "ldam-drw")  # built from the training split's class counts


def _check_every_class_trains(loss: str, data: DataBundle) -> None:
    """A loss built from class counts needs every class in the training split; the library rejects a zero count,
    and here the error names the flag and the class instead."""
    counts = data.class_counts()
    if loss in COUNTED_LOSSES and not bool((counts > 0).all()):
        name = data.class_names[int(torch.nonzero(counts == 0)[0])]
        raise ConfigError(
            f"--loss {loss} uses the training split's class counts, and class {name!r} has no training example "
            f"(class counts {counts.tolist()}); give it more examples or a smaller --val-fraction, or leave it out "
            "with --classes"
        )


def build_criterion(config: TrainConfig, data: DataBundle) -> Criterion:
    """``criterion(logits (B, C), target (B,), epoch, reduction)`` for the configured loss and training split.

    ``bce`` trains C one-vs-rest sigmoid heads on one-hot targets (the per-example loss sums over the heads);
    ``cb`` is cross-entropy with class-balanced weights; ``ldam-drw`` switches those weights on at ``--drw-epoch``.
    """
    _check_every_class_trains(config.loss, data)
    counts = data.class_counts().double()
    num_classes = data.num_classes
    smoothing = config.label_smoothing
    loss = config.loss
    if loss == "ce":
        return lambda x, y, epoch, reduction: xent.cross_entropy(x, y, label_smoothing=smoothing, reduction=reduction)
    if loss == "bce":

        def bce(x: torch.Tensor, y: torch.Tensor, epoch: int, reduction: str) -> torch.Tensor:
            per_head = xent.binary_cross_entropy_with_logits(
                x, F.one_hot(y, num_classes).to(x.dtype), label_smoothing=smoothing, reduction="none"
            )
            per_example = per_head.sum(1)
            return per_example.sum() if reduction == "sum" else per_example.mean()

        return bce
    if loss == "focal":
        return lambda x, y, epoch, reduction: xent.focal_loss(x, y, gamma=config.gamma, reduction=reduction)
    if loss == "cb":
        weights = xent.class_balanced_weights(counts, beta=config.beta)
        return lambda x, y, epoch, reduction: xent.cross_entropy(
            x, y, weight=weights.to(x.device), label_smoothing=smoothing, reduction=reduction
        )
    if loss == "la":
        return lambda x, y, epoch, reduction: xent.logit_adjusted_cross_entropy(
            x, y, class_counts=counts, tau=config.tau, label_smoothing=smoothing, reduction=reduction
        )
    if loss == "balanced-softmax":
        return lambda x, y, epoch, reduction: xent.balanced_softmax_cross_entropy(
            x, y, class_counts=counts, label_smoothing=smoothing, reduction=reduction
        )
    if loss == "ldam-drw":

        def ldam(x: torch.Tensor, y: torch.Tensor, epoch: int, reduction: str) -> torch.Tensor:
            weights = xent.deferred_reweighting(counts, epoch, start_epoch=config.drw_epoch, beta=config.beta)
            # x are cosine similarities: with --loss ldam-drw the model ends in a normalised head (models.NormedLinear)
            return xent.ldam_loss(x, y, class_counts=counts, weight=weights.to(x.device), reduction=reduction)

        return ldam
    if loss == "gce":
        return lambda x, y, epoch, reduction: xent.generalized_cross_entropy(x, y, q=config.q, reduction=reduction)
    if loss == "sce":
        return lambda x, y, epoch, reduction: xent.symmetric_cross_entropy(
            x, y, alpha=config.sce_alpha, beta=config.sce_beta, reduction=reduction
        )
    if loss == "poly1":
        return lambda x, y, epoch, reduction: xent.poly1_cross_entropy(
            x, y, epsilon=config.poly_epsilon, label_smoothing=smoothing, reduction=reduction
        )
    raise ValueError(f"--loss {loss} unknown")
