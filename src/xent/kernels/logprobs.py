"""Per-token log-probabilities and entropies of a linear head, chunk by chunk: the ``N × V`` logits are never formed.

Data flow of :class:`ChunkedLinearLogProbs` (``z = (x Wᵀ + b) / T``, ``log p = z − lse``)::

    forward, for each chunk of tokens X_c (c × D):
        L_c = X_c Wᵀ + b                         GEMM 1, a (c × V) buffer reused by every chunk
        for each block of rows of L_c:           (sized to stay in cache, as in xent.kernels.chunked)
            z' = L / T − max                     in place (a float32 copy for half precision)
            log p_y = z'_y − log Σ e^z'           the target's log-probability, 0 for ignored rows
            H       = log Σ e^z' − Σ e^z' z' / Σ e^z'
        kept: lse (N,) and H (N,)

    backward (g_lp, g_H: the two outputs' per-token grad_outputs, either None), for each chunk:
        L_c  = X_c Wᵀ + b                        GEMM 1 again: the gradient needs g_lp and g_H
        G_c  = (g_lp (e_y − p) − g_H p (log p + H)) / T    in place over L_c, block by block
        dX_c = G_c W                             GEMM 2
        dW  += G_cᵀ X_c                          GEMM 3, into a float32 (float64) buffer
        db  += Σ_rows G_c                        in float32 (float64)

The GEMM loop is :func:`xent.kernels.linear.fused_pass`'s, driven by a chunk function for each pass. Extra memory:
one logits chunk, a block of float32 rows, and ``dW``/``db`` in float32 for half-precision heads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

from xent.core.reduce import accumulation_dtype
from xent.kernels import chunked
from xent.kernels.linear import ChunkLoss, cast_grads, default_chunk_size, fused_pass, new_grads
from xent.kernels.threads import for_each_block

SECOND_ORDER_MESSAGE = (
    "linear_log_probs recomputes its gradient chunk by chunk without a graph and cannot differentiate it again; "
    "for second-order gradients (create_graph=True) compute "
    "torch.log_softmax(F.linear(input, linear_weight, linear_bias).float() / temperature, -1) on the materialised "
    "logits instead"
)


def _for_each_row_block(logits: torch.Tensor, block_: Callable[[slice], None]) -> None:
    """``block_(rows)`` for each cache-sized block of a chunk's rows, shared out over threads on the CPU."""
    num_rows, vocab_size = logits.shape
    for_each_block(num_rows, chunked.rows_per_block(vocab_size, logits.device), block_, logits.device)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` in the accumulation dtype, in place when ``logits`` already has it (the buffer is scratch)."""
    z = logits.to(accumulation_dtype(logits.dtype))
    return z if temperature == 1.0 else z.div_(temperature)


def _safe_target(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid (B,), column (B, 1))``: which rows count, and their target with ignored ones replaced by 0."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)


def forward_block_(
    logits: torch.Tensor, target: torch.Tensor, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p_y, H, lse)`` of a block of rows ``(B, V)``, each ``(B,)`` in the accumulation dtype; ``logits`` is
    overwritten. Ignored rows get ``log p_y = 0``."""
    z = _scaled(logits, temperature)
    row_max = z.amax(dim=1, keepdim=True)
    z.sub_(row_max)  # z' ≤ 0
    valid, column = _safe_target(target, ignore_index)
    target_logit = z.gather(1, column).squeeze(1)
    # A class masked with a -inf logit has e^z' = 0; clamped, its term e^z' · z' is 0, not 0 · -inf = NaN.
    z.clamp_(min=torch.finfo(z.dtype).min)
    exp = z.exp()
    total = exp.sum(dim=1)
    log_total = total.log()
    weighted = exp.mul_(z).sum(dim=1)  # Σ e^z' z'
    entropy = log_total - weighted / total
    log_probs = torch.where(valid, target_logit - log_total, torch.zeros_like(log_total))
    return log_probs, entropy, row_max.squeeze(1) + log_total


def backward_block_(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    ignore_index: int,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_log_probs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
) -> None:
    """Overwrite a block of logits ``(B, V)`` with ``∂(g_lp · log p_y + g_H · H)/∂logits`` row by row:
    ``(g_lp (e_y − p) − g_H p (log p + H)) / T``, ``g_lp`` taken as 0 on ignored rows. At least one of the two
    grad_outputs ``(B,)`` is given."""
    z = _scaled(logits, temperature)
    log_p = z.sub_(lse.unsqueeze(1))
    valid, column = _safe_target(target, ignore_index)
    if grad_log_probs is not None:
        grad_log_probs = torch.where(valid, grad_log_probs, torch.zeros_like(grad_log_probs))
    if grad_entropy is None:
        # one of the two grad_outputs is given
        grad = log_p.exp_().mul_(-cast(torch.Tensor, grad_log_probs).unsqueeze(1))  # −g_lp p
    else:
        log_p.clamp_(min=torch.finfo(z.dtype).min)  # p log p = 0 for a -inf logit, as in the forward
        probs = log_p.exp()
        grad = log_p.mul_(probs).mul_(-grad_entropy.unsqueeze(1))  # −g_H p log p
        coefficient = grad_entropy * entropy
        if grad_log_probs is not None:
            coefficient = coefficient + grad_log_probs
        grad.addcmul_(probs, coefficient.unsqueeze(1), value=-1.0)  # − p (g_lp + g_H H)
    if grad_log_probs is not None:
        grad.scatter_add_(1, column, grad_log_probs.unsqueeze(1))  # + g_lp e_y
    if temperature != 1.0:
        grad.div_(temperature)
    if grad is not logits:
        logits.copy_(grad)


def _forward_chunk_loss(
    target: torch.Tensor, temperature: float, ignore_index: int, entropy: torch.Tensor, lse: torch.Tensor
) -> ChunkLoss:
    """The forward pass's chunk function: returns the chunk's log-probabilities, writes its entropies and
    log-sum-exps into ``entropy`` and ``lse`` ``(N,)``."""

    def chunk_loss(logits: torch.Tensor, rows: slice, grad_scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        log_probs = torch.empty(logits.shape[0], dtype=lse.dtype, device=logits.device)

        def block_(block: slice) -> None:
            token = slice(rows.start + block.start, rows.start + block.stop)
            log_probs[block], entropy[token], lse[token] = forward_block_(
                logits[block], target[token], temperature, ignore_index
            )

        _for_each_row_block(logits, block_)
        return log_probs

    return chunk_loss


def _backward_chunk_loss(
    target: torch.Tensor,
    temperature: float,
    ignore_index: int,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_log_probs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
) -> ChunkLoss:
    """The backward pass's chunk function: writes the chunk's gradient over its logits (its return is unused)."""

    def rows_of(tensor: torch.Tensor | None, token: slice) -> torch.Tensor | None:
        return None if tensor is None else tensor[token]

    def chunk_loss(logits: torch.Tensor, rows: slice, grad_scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        def block_(block: slice) -> None:
            token = slice(rows.start + block.start, rows.start + block.stop)
            backward_block_(
                logits[block],
                target[token],
                temperature,
                ignore_index,
                lse[token],
                entropy[token],
                rows_of(grad_log_probs, token),
                rows_of(grad_entropy, token),
            )

        _for_each_row_block(logits, block_)
        return grad_scale  # placeholder per-token values: the backward pass keeps none

    return chunk_loss


class ChunkedLinearLogProbs(torch.autograd.Function):
    """``(log p_y, H)`` of each token of the head ``input @ linear_weight.T + linear_bias`` at temperature ``T``
    without the logits (see the module docstring). The forward keeps the log-sum-exps; the backward recomputes the
    logits chunk by chunk, since the gradient depends on both per-token grad_outputs (either may be None)."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        linear_bias: torch.Tensor | None,
        target: torch.Tensor,
        temperature: float,
        ignore_index: int,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # an unused output's grad_output arrives as None
        dtype = accumulation_dtype(input.dtype)
        num_tokens = input.shape[0]
        entropy = torch.empty(num_tokens, dtype=dtype, device=input.device)
        lse = torch.empty_like(entropy)
        chunk_loss = _forward_chunk_loss(target, temperature, ignore_index, entropy, lse)
        ones = torch.ones(num_tokens, dtype=dtype, device=input.device)
        log_probs = fused_pass(input, linear_weight, linear_bias, chunk_loss, ones, chunk_size, (None,) * 3)
        ctx.temperature, ctx.ignore_index, ctx.chunk_size = temperature, ignore_index, chunk_size
        ctx.save_for_backward(input, linear_weight, linear_bias, target, lse, entropy)
        return log_probs, entropy.clone()  # a copy: the caller may change its outputs in place (N floats)

    @staticmethod
    def backward(
        ctx: Any, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_ORDER_MESSAGE)
        unused = (None,) * 4
        needs = ctx.needs_input_grad[:3]
        if (grad_log_probs is None and grad_entropy is None) or not any(needs):
            return None, None, None, *unused
        input, linear_weight, linear_bias, target, lse, entropy = ctx.saved_tensors
        dtype = lse.dtype
        grad_log_probs = None if grad_log_probs is None else grad_log_probs.to(dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(dtype)
        chunk_loss = _backward_chunk_loss(
            target, ctx.temperature, ctx.ignore_index, lse, entropy, grad_log_probs, grad_entropy
        )
        grads = new_grads(input, linear_weight, linear_bias, needs, accumulation_dtype(linear_weight.dtype))
        ones = torch.ones(input.shape[0], dtype=dtype, device=input.device)
        fused_pass(input, linear_weight, linear_bias, chunk_loss, ones, ctx.chunk_size, grads)
        return *cast_grads(grads, input, linear_weight, linear_bias), *unused


def chunked_linear_log_probs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p_y, H)``, each ``(N,)`` in the accumulation dtype, of canonical tensors (``input (N, D)``,
    ``target (N,)``) by :class:`ChunkedLinearLogProbs`; ``chunk_size`` defaults to
    :func:`xent.kernels.linear.default_chunk_size`."""
    chunk_size = chunk_size or default_chunk_size(
        input.shape[0], linear_weight.shape[0], input.device, input.element_size()
    )
    return cast(
        tuple[torch.Tensor, torch.Tensor],
        ChunkedLinearLogProbs.apply(
            input.contiguous(), linear_weight, linear_bias, target, temperature, ignore_index, chunk_size
        ),
    )
