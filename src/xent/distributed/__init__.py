"""Losses over a vocabulary split across the ranks of a ``torch.distributed`` process group (tensor parallelism):
the logits are never gathered. See :mod:`xent.distributed.vocab_parallel`, for distillation
:mod:`xent.distributed.divergence`, and for per-token log-probabilities :mod:`xent.distributed.logprobs`."""

from xent.distributed.divergence import (
    vocab_parallel_distillation_loss,
    vocab_parallel_linear_distillation,
    vocab_parallel_linear_distillation_loss,
)
from xent.distributed.logprobs import vocab_parallel_linear_log_probs, vocab_parallel_linear_token_outputs
from xent.distributed.vocab_parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_loss,
    vocab_parallel_loss,
)

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_distillation_loss",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_distillation",
    "vocab_parallel_linear_distillation_loss",
    "vocab_parallel_linear_log_probs",
    "vocab_parallel_linear_loss",
    "vocab_parallel_linear_token_outputs",
    "vocab_parallel_loss",
]
