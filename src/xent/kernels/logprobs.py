"""Per-token outputs of a linear head, chunk by chunk: the ``N × V`` logits are never formed.

Data flow of :func:`linear_log_probs_forward` and :func:`linear_log_probs_gradients`, which the custom operators
``xent::linear_log_probs`` and its backward run (``L = x Wᵀ + b``, ``z = a · c·tanh(L / c)`` or ``z = a · L`` without
a soft cap, ``a = logit_scale / T``; ``log p = z − lse``)::

    forward, for each chunk of tokens X_c (c × D):
        L_c = X_c Wᵀ + b                         GEMM 1, a (c × V) buffer reused by every chunk
        for each block of rows of L_c:           (sized to stay in cache, as in xent.kernels.chunked)
            z' = z − max                         in place (a float32 copy for half precision)
            log p_y = z'_y − log Σ e^z'           the target's log-probability, 0 for ignored rows
            H       = log Σ e^z' − Σ e^z' z' / Σ e^z'           when asked for
            log Σ p² = 2 (log ‖e^z'‖₂ − log Σ e^z')             when asked for, no gradient
            mean z  = Σ z' / V + max                             when asked for, no gradient
            top-1   = argmax z == y (the first maximum)          when asked for
        kept: lse (N,), and H (N,) when asked for

    backward (g_lp, g_H: the two outputs' per-token grad_outputs, either None), for each chunk:
        L_c  = X_c Wᵀ + b                        GEMM 1 again: the gradient needs g_lp and g_H
        G_c  = (g_lp (e_y − p) − g_H p (log p + H)) · dz/dL          in place over L_c, block by block,
                                                 dz/dL = a (1 − tanh²(L / c)), or a without a cap
        dX_c = G_c W                             GEMM 2
        dW  += G_cᵀ X_c                          GEMM 3, into a float32 (float64) buffer
        db  += Σ_rows G_c                        in float32 (float64)

The GEMM loop is :func:`xent.kernels.linear.fused_pass`'s, driven by a chunk function for each pass. Extra memory:
one logits chunk, a block of float32 rows (two with a soft cap, in the backward), and ``dW``/``db`` in float32 for
half-precision heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from xent.core.reduce import accumulation_dtype
from xent.kernels import chunked
from xent.kernels.linear import ChunkLoss, cast_grads, fused_pass, new_grads
from xent.kernels.threads import for_each_block

SECOND_ORDER_MESSAGE = (
    "linear_log_probs recomputes its gradient chunk by chunk without a graph and cannot differentiate it again; "
    "for second-order gradients (create_graph=True) compute "
    "torch.log_softmax(F.linear(input, linear_weight, linear_bias).float() / temperature, -1) on the materialised "
    "logits instead"
)
# The per-token outputs besides the log-probabilities, in the order the kernel returns them.
STATISTICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class HeadTransform:
    """What turns the head's output ``L`` into the logits ``z``: ``z = scale · softcap · tanh(L / softcap)``, or
    ``z = scale · L`` when ``softcap`` is None (``scale`` folds the logit scale and ``1 / T``)."""

    scale: float = 1.0
    softcap: float | None = None

    def apply_(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(z, tanh(L / c))`` of a block ``L`` in the accumulation dtype, in place when ``logits`` already has it
        (the buffer is scratch); the tanh is None without a soft cap."""
        z = logits.to(accumulation_dtype(logits.dtype))
        if self.softcap is None:
            return (z if self.scale == 1.0 else z.mul_(self.scale)), None
        tanh = torch.tanh(z / self.softcap)
        return torch.mul(tanh, self.scale * self.softcap, out=z), tanh

    def chain_(self, grad: torch.Tensor, tanh: torch.Tensor | None) -> torch.Tensor:
        """``∂/∂L`` from ``∂/∂z`` (in place): times ``scale (1 − tanh²)``."""
        if tanh is not None:
            grad.mul_(tanh.square_().neg_().add_(1.0))
        return grad if self.scale == 1.0 else grad.mul_(self.scale)


class RowOutputs(NamedTuple):
    """A block's per-row outputs ``(B,)``, each None when not asked for."""

    log_probs: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None
    mean_logits: torch.Tensor | None
    is_top1: torch.Tensor | None


def for_each_row_block(logits: torch.Tensor, block_: Callable[[slice], None]) -> None:
    """``block_(rows)`` for each cache-sized block of a chunk's rows, shared out over threads on the CPU."""
    num_rows, vocab_size = logits.shape
    for_each_block(num_rows, chunked.rows_per_block(vocab_size, logits.device), block_, logits.device)


def _safe_target(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid (B,), column (B, 1))``: which rows count, and their target with ignored ones replaced by 0."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)


def forward_block_(
    logits: torch.Tensor,
    target: torch.Tensor,
    transform: HeadTransform,
    ignore_index: int,
    statistics: frozenset[str],
) -> tuple[RowOutputs, torch.Tensor]:
    """The outputs of a block of rows ``(B, V)`` named in ``statistics`` (and always ``log p_y``, 0 for ignored
    rows), and the rows' log-sum-exps, in the accumulation dtype; ``logits`` is overwritten."""
    z, _ = transform.apply_(logits)
    valid, column = _safe_target(target, ignore_index)
    is_top1 = (z.argmax(dim=1) == column.squeeze(1)) & valid if "is_top1" in statistics else None
    row_max = z.amax(dim=1, keepdim=True)
    z.sub_(row_max)  # z' ≤ 0
    target_logit = z.gather(1, column).squeeze(1)
    mean_logits = z.sum(dim=1).div_(z.shape[1]).add_(row_max.squeeze(1)) if "mean_logits" in statistics else None
    # A class masked with a -inf logit has e^z' = 0; clamped, its term e^z' · z' is 0, not 0 · -inf = NaN.
    z.clamp_(min=torch.finfo(z.dtype).min)
    exp = z.exp()
    total = exp.sum(dim=1)
    log_total = total.log()
    log_sum_sq_probs = None
    if "log_sum_sq_probs" in statistics:  # log Σ p² = 2 (log ‖e^z'‖₂ − log Σ e^z')
        log_sum_sq_probs = torch.linalg.vector_norm(exp, dim=1).log_().sub_(log_total).mul_(2.0)
    entropy = None
    if "entropy" in statistics:
        entropy = log_total - exp.mul_(z).sum(dim=1).div_(total)  # log Σ e^z' − Σ e^z' z' / Σ e^z'
    log_probs = torch.where(valid, target_logit - log_total, torch.zeros_like(log_total))
    return RowOutputs(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), row_max.squeeze(1) + log_total


def backward_block_(
    logits: torch.Tensor,
    target: torch.Tensor,
    transform: HeadTransform,
    ignore_index: int,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_log_probs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
) -> None:
    """Overwrite a block of head outputs ``(B, V)`` with ``∂(g_lp · log p_y + g_H · H)/∂L`` row by row
    (:func:`gradient_block_` over the whole vocabulary). At least one of the two grad_outputs ``(B,)`` is given;
    ``entropy`` is when ``grad_entropy`` is."""
    valid, column = _safe_target(target, ignore_index)
    gradient_block_(logits, transform, lse, entropy, grad_log_probs, grad_entropy, valid, column, valid)


def gradient_block_(
    logits: torch.Tensor,
    transform: HeadTransform,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_log_probs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    valid: torch.Tensor,
    column: torch.Tensor,
    held: torch.Tensor,
) -> None:
    """Overwrite a block of head outputs ``(B, V)`` — the whole vocabulary, or one rank's columns of it — with
    ``(g_lp (e_y − p) − g_H p (log p + H)) · dz/dL``: ``g_lp`` taken as 0 on rows not ``valid``, ``e_y`` the column
    ``column (B, 1)`` of the rows whose target the block ``held``; ``lse`` and ``entropy`` are the whole
    vocabulary's."""
    z, tanh = transform.apply_(logits)
    log_p = z.sub_(lse.unsqueeze(1))
    if grad_log_probs is not None:
        grad_log_probs = torch.where(valid, grad_log_probs, torch.zeros_like(grad_log_probs))
    if grad_entropy is None or entropy is None:
        if grad_log_probs is None:  # pragma: no cover - the autograd Functions return before
            raise RuntimeError("gradient_block_ needs a grad_output")
        grad = log_p.exp_().mul_(-grad_log_probs.unsqueeze(1))  # −g_lp p
    else:
        log_p.clamp_(min=torch.finfo(z.dtype).min)  # p log p = 0 for a -inf logit, as in the forward
        probs = log_p.exp()
        grad = log_p.mul_(probs).mul_(-grad_entropy.unsqueeze(1))  # −g_H p log p
        coefficient = grad_entropy * entropy
        if grad_log_probs is not None:
            coefficient = coefficient + grad_log_probs
        grad.addcmul_(probs, coefficient.unsqueeze(1), value=-1.0)  # − p (g_lp + g_H H)
    if grad_log_probs is not None:
        grad.scatter_add_(1, column, (grad_log_probs * held).unsqueeze(1))  # + g_lp e_y
    grad = transform.chain_(grad, tanh)
    if grad is not logits:
        logits.copy_(grad)


def _forward_chunk_loss(
    target: torch.Tensor,
    transform: HeadTransform,
    ignore_index: int,
    statistics: frozenset[str],
    outputs: dict[str, torch.Tensor],
    lse: torch.Tensor,
) -> ChunkLoss:
    """The forward pass's chunk function: returns the chunk's log-probabilities, writes its log-sum-exps into
    ``lse`` and its statistics into ``outputs`` (each ``(N,)``)."""

    def chunk_loss(logits: torch.Tensor, rows: slice, grad_scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        log_probs = torch.empty(logits.shape[0], dtype=lse.dtype, device=logits.device)

        def block_(block: slice) -> None:
            token = slice(rows.start + block.start, rows.start + block.stop)
            row_outputs, lse[token] = forward_block_(logits[block], target[token], transform, ignore_index, statistics)
            log_probs[block] = row_outputs.log_probs
            for name, values in outputs.items():
                values[token] = getattr(row_outputs, name)

        for_each_row_block(logits, block_)
        return log_probs

    return chunk_loss


def _backward_chunk_loss(
    target: torch.Tensor,
    transform: HeadTransform,
    ignore_index: int,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
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
                transform,
                ignore_index,
                lse[token],
                rows_of(entropy, token),
                rows_of(grad_log_probs, token),
                rows_of(grad_entropy, token),
            )

        for_each_row_block(logits, block_)
        return grad_scale  # placeholder per-token values: the backward pass keeps none

    return chunk_loss


def linear_log_probs_forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    transform: HeadTransform,
    ignore_index: int,
    chunk_size: int,
    statistics: frozenset[str],
) -> tuple[RowOutputs, torch.Tensor]:
    """``(log p_y, H, log Σ p², mean z, top-1)`` of each token of the head ``input @ linear_weight.T + linear_bias``
    under ``transform``, without the logits (see the module docstring), the statistics not named None; and the
    log-sum-exps the backward reads."""
    dtype = accumulation_dtype(input.dtype)
    num_tokens = input.shape[0]
    outputs = {
        name: torch.empty(num_tokens, dtype=torch.bool if name == "is_top1" else dtype, device=input.device)
        for name in STATISTICS
        if name in statistics
    }
    lse = torch.empty(num_tokens, dtype=dtype, device=input.device)
    chunk_loss = _forward_chunk_loss(target, transform, ignore_index, statistics, outputs, lse)
    ones = torch.ones(num_tokens, dtype=dtype, device=input.device)
    log_probs = fused_pass(input, linear_weight, linear_bias, chunk_loss, ones, chunk_size, (None,) * 3)
    return RowOutputs(log_probs, *(outputs.get(name) for name in STATISTICS)), lse


def linear_log_probs_gradients(
    grad_log_probs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    transform: HeadTransform,
    ignore_index: int,
    chunk_size: int,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``input``, ``linear_weight``, ``linear_bias`` flagged in ``needs``, of
    ``Σ grad_log_probs · log p_y + grad_entropy · H`` (either may be None): the backward recomputes the logits
    chunk by chunk, since the gradient depends on both grad_outputs."""
    dtype = lse.dtype
    grad_log_probs = None if grad_log_probs is None else grad_log_probs.to(dtype)
    grad_entropy = None if grad_entropy is None else grad_entropy.to(dtype)
    chunk_loss = _backward_chunk_loss(target, transform, ignore_index, lse, entropy, grad_log_probs, grad_entropy)
    grads = new_grads(input, linear_weight, linear_bias, needs, accumulation_dtype(linear_weight.dtype))
    ones = torch.ones(input.shape[0], dtype=dtype, device=input.device)
    fused_pass(input, linear_weight, linear_bias, chunk_loss, ones, chunk_size, grads)
    return cast_grads(grads, input, linear_weight, linear_bias)
