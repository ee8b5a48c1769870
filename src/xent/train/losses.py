"""Every loss ``xent train --loss`` (and ``xent compare --losses``) accepts: one table entry per loss.

An entry says what the loss is (the help text reads it), which configuration fields it reads (their flags' help
says which losses use them), whether it is built from the training split's class counts, whether the model ends in
a cosine head, and how its criterion is built. A new loss is one entry here and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

import xent
from xent.losses.family import FAMILY

if TYPE_CHECKING:
    from xent.train.config import TrainConfig

# (logits (B, C), target (B,), epoch, reduction "mean" | "sum") → loss
Criterion = Callable[[torch.Tensor, torch.Tensor, int, str], torch.Tensor]
# (configuration, the training split's class counts (C,) in float64) → criterion
Builder = Callable[["TrainConfig", torch.Tensor], Criterion]

LDAM_SCALE = 30.0  # s of Cao et al. (2019): the cosine head's outputs times s are the logits


@dataclass(frozen=True)
class TrainLoss:
    summary: str
    build: Builder
    flags: tuple[str, ...] = ()  # the TrainConfig fields the loss reads
    counted: bool = False  # built from the training split's class counts: every class must have one
    cosine_scale: float | None = None  # the model ends in a cosine head whose outputs are scaled by this
    family: str | None = None  # the loss of the fused family (xent.losses.family.FAMILY) it trains with, if any

    def __post_init__(self) -> None:
        if self.family is not None and self.family not in FAMILY:
            raise ValueError(f"family must name a loss of xent.losses.family.FAMILY, got {self.family!r}")


def _per_example(reduction: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.sum if reduction == "sum" else torch.mean


def _ce(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    return lambda x, y, epoch, reduction: xent.cross_entropy(
        x, y, label_smoothing=config.label_smoothing, reduction=reduction
    )


def _mse(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    def mse(x: torch.Tensor, y: torch.Tensor, epoch: int, reduction: str) -> torch.Tensor:
        squared = (torch.softmax(x, 1) - F.one_hot(y, x.shape[1]).to(x.dtype)).square().sum(1)
        return _per_example(reduction)(squared)

    return mse


def _bce(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    def bce(x: torch.Tensor, y: torch.Tensor, epoch: int, reduction: str) -> torch.Tensor:
        per_head = xent.binary_cross_entropy_with_logits(
            x, F.one_hot(y, x.shape[1]).to(x.dtype), label_smoothing=config.label_smoothing, reduction="none"
        )
        return _per_example(reduction)(per_head.sum(1))

    return bce


def _focal(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    return lambda x, y, epoch, reduction: xent.focal_loss(x, y, gamma=config.gamma, reduction=reduction)


def _class_balanced(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    weights = xent.class_balanced_weights(counts, beta=config.beta)
    return lambda x, y, epoch, reduction: xent.cross_entropy(
        x, y, weight=weights.to(x.device), label_smoothing=config.label_smoothing, reduction=reduction
    )


def _logit_adjusted(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    return lambda x, y, epoch, reduction: xent.logit_adjusted_cross_entropy(
        x, y, class_counts=counts, tau=config.tau, label_smoothing=config.label_smoothing, reduction=reduction
    )


def _balanced_softmax(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    return lambda x, y, epoch, reduction: xent.balanced_softmax_cross_entropy(
        x, y, class_counts=counts, label_smoothing=config.label_smoothing, reduction=reduction
    )


def _ldam_drw(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    def ldam(x: torch.Tensor, y: torch.Tensor, epoch: int, reduction: str) -> torch.Tensor:
        # resolve() sets drw_epoch for the losses that read it
        weights = xent.deferred_reweighting(counts, epoch, start_epoch=cast(int, config.drw_epoch), beta=config.beta)
        # x = s · cos: the logits every metric reads; LDAM subtracts its margins from the cosines, then scales by s
        return xent.ldam_loss(
            x / LDAM_SCALE, y, class_counts=counts, scale=LDAM_SCALE, weight=weights.to(x.device), reduction=reduction
        )

    return ldam


def _gce(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    return lambda x, y, epoch, reduction: xent.generalized_cross_entropy(x, y, q=config.q, reduction=reduction)


def _sce(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    return lambda x, y, epoch, reduction: xent.symmetric_cross_entropy(
        x, y, alpha=config.sce_alpha, beta=config.sce_beta, reduction=reduction
    )


def _poly1(config: TrainConfig, counts: torch.Tensor) -> Criterion:
    return lambda x, y, epoch, reduction: xent.poly1_cross_entropy(
        x, y, epsilon=config.poly_epsilon, label_smoothing=config.label_smoothing, reduction=reduction
    )


LOSSES: dict[str, TrainLoss] = {
    "ce": TrainLoss("cross-entropy", _ce, ("label_smoothing",), family="cross_entropy"),
    "mse": TrainLoss(
        "squared error between softmax(x) and the one-hot target — the textbook baseline, not a recommendation", _mse
    ),
    "bce": TrainLoss("one-vs-rest: binary cross-entropy of each class's sigmoid, summed", _bce, ("label_smoothing",)),
    "focal": TrainLoss("focal loss (Lin et al., 2017)", _focal, ("gamma",), family="focal_loss"),
    "cb": TrainLoss(
        "cross-entropy with class-balanced weights (Cui et al., 2019)",
        _class_balanced,
        ("beta", "label_smoothing"),
        counted=True,
        family="cross_entropy",
    ),
    "la": TrainLoss(
        "logit-adjusted cross-entropy (Menon et al., 2021)",
        _logit_adjusted,
        ("tau", "label_smoothing"),
        counted=True,
        family="logit_adjusted_cross_entropy",
    ),
    "balanced-softmax": TrainLoss(
        "balanced softmax (Ren et al., 2020)",
        _balanced_softmax,
        ("label_smoothing",),
        counted=True,
        family="balanced_softmax_cross_entropy",
    ),
    "ldam-drw": TrainLoss(
        "LDAM with deferred re-weighting and a cosine head (Cao et al., 2019)",
        _ldam_drw,
        ("beta", "drw_epoch"),
        counted=True,
        cosine_scale=LDAM_SCALE,
        family="ldam_loss",
    ),
    "gce": TrainLoss(
        "generalized cross-entropy (Zhang & Sabuncu, 2018)", _gce, ("q",), family="generalized_cross_entropy"
    ),
    "sce": TrainLoss(
        "symmetric cross-entropy (Wang et al., 2019)",
        _sce,
        ("sce_alpha", "sce_beta"),
        family="symmetric_cross_entropy",
    ),
    "poly1": TrainLoss(
        "Poly-1 (Leng et al., 2022)", _poly1, ("poly_epsilon", "label_smoothing"), family="poly1_cross_entropy"
    ),
}


def used_by(field: str) -> str:
    """The losses that read a configuration field, for its flag's help: ``" (ce, la, ...)"``."""
    return f" ({', '.join(name for name, loss in LOSSES.items() if field in loss.flags)})"
