"""Evaluation metrics through torchmetrics, plus the two proper scoring rules computed alongside.

Losses are sums over examples divided by the number of examples — never a mean of batch means — and every metric
is synchronised across processes under torchrun (torchmetrics does it when a process group exists). torchmetrics
(with the scipy it imports, ~1.5 s) is imported at the first evaluation, not when ``xent train`` starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

ECE_BINS = 15


@dataclass
class Metrics:
    loss: float  # the training criterion, summed over examples / N
    accuracy: float
    balanced_accuracy: float  # recall averaged over the classes that have examples in the split
    macro_f1: float
    nll: float  # -log softmax(x)_y, summed / N
    ece: float  # expected calibration error, 15 equal-width bins
    brier: float  # Σ_c (p_c - 1[c = y])², averaged over examples
    per_class_accuracy: list[float | None]  # recall of each class; None for a class with no example in the split
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    reliability: list[list[float]]  # per confidence bin: count, Σ confidence, Σ correct

    def headline(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "nll": self.nll,
            "ece": self.ece,
            "brier": self.brier,
        }


class MetricSet:
    """Accumulates batches of logits and targets; :meth:`compute` returns :class:`Metrics` over all of them."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassCalibrationError,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
        )

        self.num_classes = num_classes
        self.accuracy = MulticlassAccuracy(num_classes, average="micro").to(device)
        self.f1 = MulticlassF1Score(num_classes, average="macro").to(device)
        self.ece = MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm="l1").to(device)
        self.confusion = MulticlassConfusionMatrix(num_classes).to(device)
        # loss sum, NLL sum, Brier sum, count — in float64 so that long sums stay exact
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.bins = torch.zeros(ECE_BINS, 3, dtype=torch.float64, device=device)  # for the reliability diagram

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> None:
        logits = logits.detach().float()
        probs = torch.softmax(logits, dim=1)
        for metric in (self.accuracy, self.f1, self.confusion):
            metric.update(logits, target)
        self.ece.update(probs, target)
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        brier = (probs - torch.nn.functional.one_hot(target, self.num_classes)).square().sum()
        self.sums += torch.stack([loss_sum.detach().double(), nll.double(), brier.double(),
                                  torch.tensor(len(target), dtype=torch.float64, device=self.sums.device)])  # fmt: skip
        confidence, prediction = probs.max(dim=1)
        bin_index = (confidence * ECE_BINS).long().clamp_max(ECE_BINS - 1)
        stats = torch.stack([torch.ones_like(confidence), confidence, (prediction == target).float()], 1).double()
        self.bins.index_add_(0, bin_index, stats)

    def compute(self) -> Metrics:
        sums, bins = self.sums.clone(), self.bins.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(bins)
        count = max(float(sums[3]), 1.0)
        confusion = self.confusion.compute().long()  # (C, C)
        recall = per_class_recall(confusion)
        present = [r for r in recall if r is not None]
        return Metrics(
            loss=float(sums[0]) / count,
            accuracy=float(self.accuracy.compute()),
            balanced_accuracy=sum(present) / max(len(present), 1),
            macro_f1=float(self.f1.compute()),
            nll=float(sums[1]) / count,
            ece=float(self.ece.compute()),
            brier=float(sums[2]) / count,
            per_class_accuracy=recall,
            confusion_matrix=confusion.tolist(),
            reliability=bins.tolist(),
        )


def per_class_recall(confusion: torch.Tensor) -> list[float | None]:
    """Each class's share of its examples predicted right, from a confusion matrix (rows: true class); ``None`` for
    a class with no example — there is nothing to score, and 0 would read as a class the model always gets wrong."""
    support = confusion.sum(1).tolist()
    correct = confusion.diagonal().tolist()
    return [c / n if n else None for c, n in zip(correct, support, strict=True)]


def labelled_bins(reliability: list[list[float]]) -> list[dict[str, float | None]]:
    """The reliability bins as ``{"lower", "upper", "count", "confidence", "accuracy"}``: the bin's confidence
    interval, its number of examples, and their mean confidence and accuracy (``None`` for an empty bin)."""
    bins: list[dict[str, float | None]] = []
    for index, (count, confidence_sum, correct_sum) in enumerate(reliability):
        bins.append({"lower": index / len(reliability), "upper": (index + 1) / len(reliability), "count": int(count),
                     "confidence": confidence_sum / count if count else None,
                     "accuracy": correct_sum / count if count else None})  # fmt: skip
    return bins


def expected_calibration_error(logits: torch.Tensor, target: torch.Tensor) -> float:
    """ECE of softmax(logits) with 15 bins (for temperature scaling reports)."""
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(logits.shape[1], n_bins=ECE_BINS, norm="l1")
    return float(metric(torch.softmax(logits.float(), 1), target))
