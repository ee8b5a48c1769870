"""One :class:`torch.nn.Module` per functional loss: the constructor stores the options, ``forward`` is one call.

Tensor options (``weight``, ``pos_weight``, ``alpha``, ``class_counts``) are registered as buffers, so they follow
``module.to(device)`` and are saved in ``state_dict``; the others are plain attributes shown in ``repr``.

The modules are defined by family, as the API reference groups them — :mod:`xent.nn.softmax`, :mod:`xent.nn.sigmoid`,
:mod:`xent.nn.linear`, :mod:`xent.nn.generative` and :mod:`xent.nn.combine`, on :mod:`xent.nn.base` — and used as
``xent.nn.X``: this package re-exports them all.
"""

from xent.nn.combine import WeightedSum
from xent.nn.generative import GANDiscriminatorLoss, GANGeneratorLoss, VAELoss
from xent.nn.linear import LinearCrossEntropyLoss, LinearLoss
from xent.nn.sigmoid import BCELoss, BCEWithLogitsLoss, SigmoidFocalLoss
from xent.nn.softmax import (
    BalancedSoftmaxCrossEntropyLoss,
    CrossEntropyLoss,
    DistillationLoss,
    FocalLoss,
    GeneralizedCrossEntropyLoss,
    LDAMLoss,
    LogitAdjustedCrossEntropyLoss,
    Poly1CrossEntropyLoss,
    SymmetricCrossEntropyLoss,
)

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "BalancedSoftmaxCrossEntropyLoss",
    "CrossEntropyLoss",
    "DistillationLoss",
    "FocalLoss",
    "GANDiscriminatorLoss",
    "GANGeneratorLoss",
    "GeneralizedCrossEntropyLoss",
    "LDAMLoss",
    "LinearCrossEntropyLoss",
    "LinearLoss",
    "LogitAdjustedCrossEntropyLoss",
    "Poly1CrossEntropyLoss",
    "SigmoidFocalLoss",
    "SymmetricCrossEntropyLoss",
    "VAELoss",
    "WeightedSum",
]
