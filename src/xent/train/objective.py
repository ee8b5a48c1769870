"""The training criterion named by ``--loss``, built from the library's losses and the training split's counts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import xent
from xent.train.config import TrainConfig

Criterion = Callable[[torch.Tensor, torch.Tensor, int, str], torch.Tensor]  # (logits, target, epoch, reduction)


def build_criterion(config: TrainConfig, class_counts: torch.Tensor) -> Criterion:
    """``criterion(logits (B, C), target (B,), epoch, reduction)`` for the configured loss.

    ``bce`` trains C one-vs-rest sigmoid heads on one-hot targets (the per-example loss sums over the heads);
    ``cb`` is cross-entropy with class-balanced weights; ``ldam-drw`` switches those weights on at ``--drw-epoch``.
    """
    counts = class_counts.clamp_min(1).double()  # a class missing from a small split must not break log-priors
    num_classes = len(counts)
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
        weights = xent.class_balanced_weights(class_counts, beta=config.beta)
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
