"""The evaluation metrics against scikit-learn's, including a class that the split does not hold."""

import math

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

from xent.train.metrics import MetricSet


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("absent", [None, 1, 3])
def test_per_class_and_balanced_accuracy_cover_only_the_classes_of_the_split(absent):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=generator)  # (N, C): every class is predicted somewhere
    target = torch.randint(4, (200,), generator=generator)
    if absent is not None:
        target[target == absent] = (absent + 1) % 4  # class `absent` has no example, yet the model predicts it
    metrics = MetricSet(4, torch.device("cpu"))
    for rows in torch.arange(200).split(64):
        metrics.update(logits[rows], target[rows], torch.zeros(()))
    result = metrics.compute()
    prediction = logits.argmax(1)
    present = sorted(set(target.tolist()))
    recall = recall_score(target, prediction, labels=present, average=None)
    assert [a for a in result.per_class_accuracy if a is not None] == pytest.approx(recall.tolist())
    assert [c for c, a in enumerate(result.per_class_accuracy) if a is None] == ([] if absent is None else [absent])
    assert result.balanced_accuracy == pytest.approx(balanced_accuracy_score(target, prediction))
    # macro-F1 keeps scikit-learn's definition: over the classes of the targets and of the predictions
    assert result.macro_f1 == pytest.approx(f1_score(target, prediction, average="macro"), rel=1e-6)
    assert math.isclose(result.accuracy, float((prediction == target).float().mean()), rel_tol=1e-6)
