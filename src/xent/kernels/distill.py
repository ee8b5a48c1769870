"""Fused linear distillation: the student's and the teacher's heads chunk by chunk, neither ``N × V`` logits formed.

For each chunk of tokens, inside :class:`xent.kernels.linear.ChunkedLinearLoss`::

    S_c = X_c Wᵀ                               the student's logits (the Function's buffer)
    log q = log_softmax(X_t,c W_tᵀ / T)        the teacher's, without gradient (a second c × V buffer)
    KL_n = T² [CE(S_c / T, q)_n + Σ q log q]    the row kernel with probability targets q and logit scale 1/T:
    G_c  = T (p − q)                            its gradient, written over S_c
    + λ · CE(S_c, y)                            the hard-label term, by the same kernel on a copy of S_c

so the student's gradient GEMMs run once on the summed gradient. Extra memory: three logits chunks (four with the
hard-label term), hence chunks of a quarter of :func:`xent.kernels.linear.default_chunk_size`'s tokens.
"""

from __future__ import annotations

from typing import cast

import torch

from xent.core.reduce import accumulation_dtype
from xent.core.rowloss import RowLoss
from xent.kernels import chunked
from xent.kernels.linear import ChunkLoss


def distillation_chunk_loss(
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    temperature: float,
    soft_factor: float | torch.Tensor,
    kernel: chunked.RowKernel,
    hard: tuple[torch.Tensor, RowLoss, float | torch.Tensor] | None = None,
) -> ChunkLoss:
    """The chunk loss ``soft_factor · T² KL(q ‖ p) + hard_factor · CE(S, y)`` of each token.

    Args:
        teacher_input: ``(N, D_t)``, read only; teacher_weight: ``(V, D_t)``; teacher_bias: ``(V,)`` or None.
        temperature: T > 0.
        soft_factor: the factor of the distillation term (``1 / N`` for a mean, 1 for a sum).
        kernel: the row kernel (chunked PyTorch or Triton).
        hard: ``(target (N,), its options, hard_factor)`` for the hard-label cross-entropy, or None.
    """
    soft_options = RowLoss(logit_scale=1.0 / temperature)
    squared = temperature**2

    def chunk_loss(logits: torch.Tensor, rows: slice, grad_scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        dtype = accumulation_dtype(logits.dtype)
        with torch.no_grad():  # two (c, V) buffers at most: log q in place of the teacher's logits, then q
            log_q = torch.nn.functional.linear(teacher_input[rows], teacher_weight, teacher_bias).to(dtype)
            log_q.div_(temperature)
            log_q.sub_(torch.logsumexp(log_q, dim=1, keepdim=True))
            probs = log_q.exp()
            # Σ q log q as a batched dot product (no third buffer); q = 0 where log q = -inf gives 0 · -inf: masked
            log_q.masked_fill_(probs == 0, 0.0)
            neg_entropy = torch.bmm(probs.unsqueeze(1), log_q.unsqueeze(2)).view(-1)
            del log_q
        student = logits.clone() if hard is not None else None
        soft_scale = grad_scale * (squared * soft_factor)
        losses = kernel(logits, logits if needs_grad else None, probs, soft_options, soft_scale)
        losses = (losses + neg_entropy) * (squared * soft_factor)
        if hard is not None:
            target, hard_options, hard_factor = hard
            student = cast(torch.Tensor, student)  # cloned above, as hard is given
            hard_scale = grad_scale * hard_factor
            hard_losses = kernel(student, student if needs_grad else None, target[rows], hard_options, hard_scale)
            if needs_grad:
                logits.add_(student)
            losses = losses + hard_factor * hard_losses
        return losses

    return chunk_loss
