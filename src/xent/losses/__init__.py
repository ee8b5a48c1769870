"""The loss functions: pure math, one module per family."""

from xent.losses.sigmoid import binary_cross_entropy, binary_cross_entropy_with_logits
from xent.losses.softmax import cross_entropy

__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy"]
