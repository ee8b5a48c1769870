"""Fused linear distillation: the student's and the teacher's heads chunk by chunk, neither ``N × V`` logits formed.

For each chunk of tokens, inside :func:`xent.kernels.linear.fused_pass` (which the custom operator
``xent::linear_distillation`` runs; the student's logits ``X_c Wᵀ + b`` are its buffer)::

    teacher: L_t = X_t,c W_tᵀ + b_t             a second (c × V) buffer, no gradient (dense teacher only)
    for each cache-sized block of rows:        (shared out over threads on the CPU, as in xent.kernels.chunked)
        u = s · cap(x), z = u / T              the student's logits; the teacher's alike
        log p, log q                           log-softmax of each (a top-k teacher's categories are given)
        D, ∂D/∂z                               core.divergence: terms, slopes, the simplex projection
        + λ CE(u, y)                           the hard-label term at T = 1, on the same block
        G = r (T ∂D/∂z + λ (softmax(u) − e_y)) · s (1 − tanh²)     written over the student's block

so the student's gradient GEMMs run once per chunk on the summed gradient: four GEMMs in all with a dense teacher
(the floor: the teacher's logits cost one), three with a top-k one. Extra memory: two logits chunks with a dense
teacher, one with a top-k teacher, plus a few blocks of rows. Ignored tokens (``kept``) get no loss and no gradient.

:func:`dense_rows_` and :func:`top_k_rows_` are the row kernels of one chunk; ``xent.kernels.triton.divergence`` has
their Triton twins, with the same signatures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from xent.core import divergence as math_
from xent.core.reduce import accumulation_dtype
from xent.kernels import buffers, chunked
from xent.kernels.linear import ChunkLoss
from xent.kernels.threads import for_each_block


@dataclass(frozen=True)
class DistillSpec:
    """What a distillation call computes, beside its tensors: the divergence (``beta`` read by ``"jsd"``), the
    temperature, each model's logit transform ``z = logit_scale · softcap · tanh(x / softcap)`` (no cap for
    ``None``) and a top-k teacher's tail treatment. ``finite_logits``: neither model's logits can be ``-inf`` (no
    bias holds one; a cap bounds them), so their log-probabilities need no clamp against ``0 · -inf`` — two passes
    over each block fewer."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None
    teacher_logit_scale: float = 1.0
    teacher_softcap: float | None = None
    tail: str = "renormalize"
    finite_logits: bool = False


@dataclass(frozen=True)
class HardLabels:
    """The hard-label term of a chunk: ``weight · CE(u, target)`` per token, ``target (c,)`` with ignored tokens
    already masked out by the caller (their target is any valid class; their ``weight`` is 0)."""

    target: torch.Tensor
    weight: torch.Tensor


def transformed(x: torch.Tensor, scale: float, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(u, tanh(x / cap))``: a model's logits ``u = scale · cap · tanh(x / cap)`` in the accumulation dtype, in
    place when ``x`` already has it (``x`` is scratch)."""
    u = x.to(accumulation_dtype(x.dtype))
    tanh = None
    if cap is not None:
        tanh = torch.tanh(u.div_(cap))
        u = tanh * (cap * scale)
    elif scale != 1.0:
        u = u.mul_(scale)
    return u, tanh


def _log_softmax_(z: torch.Tensor) -> torch.Tensor:
    """``z − logsumexp(z)`` in place over the last dimension; returns the log-sum-exp ``(B,)``."""
    lse = torch.logsumexp(z, dim=1)
    z.sub_(lse.unsqueeze(1))
    return lse


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -math_._times_exp(log_p, log_p).sum(dim=1)


def _finish_(
    student: torch.Tensor,
    grad_u: torch.Tensor,
    spec: DistillSpec,
    tanh: torch.Tensor | None,
) -> None:
    """Chain ``∂/∂u`` through the student's transform and write it over its block."""
    if tanh is not None:
        grad_u = grad_u.mul_(tanh.square_().neg_().add_(1.0))
    if spec.logit_scale != 1.0:
        grad_u = grad_u.mul_(spec.logit_scale)
    student.copy_(grad_u)


def dense_rows_(
    student: torch.Tensor,
    teacher: torch.Tensor,
    spec: DistillSpec,
    grad_scale: torch.Tensor,
    needs_grad: bool,
    entropy: torch.Tensor | None,
    hard: HardLabels | None = None,
) -> torch.Tensor:
    """Per-row ``T² D(q, p)`` of raw head outputs ``student`` and ``teacher`` ``(c, V)`` (both scratch); with
    ``needs_grad``, ``grad_scale[n] · ∂(T² D + hard term)/∂x`` written over ``student``; the student's entropy at
    temperature T into ``entropy`` when given. Returns the losses (hard term included) in the accumulation dtype.

    The closed forms of :mod:`xent.core.divergence`, written in place for each divergence: a block's log-probabilities
    overwrite its logits, one or two exponentials and the mixture are the only temporaries, and the per-row sums are
    batched dot products. Log-probabilities are clamped at the dtype's lowest number, so a probability of exactly 0
    (a masked class) contributes 0 without a ``0 · -inf``."""
    temperature = spec.temperature

    def body(
        u: torch.Tensor, rows: slice, coefficient: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        clamp = not spec.finite_logits
        log_p = _log_probs_(u, temperature, clamp)
        log_q = transformed(teacher[rows], spec.teacher_logit_scale, spec.teacher_softcap)[0]
        log_q = _log_probs_(log_q, temperature, clamp)
        p = log_p.exp()
        if entropy is not None:
            entropy[rows] = -_dot(p, log_p)
        loss = _divergence_(log_p, log_q, p, spec.divergence, spec.beta, coefficient)
        return loss, None if coefficient is None else log_p

    return _rows_(student, spec, grad_scale, needs_grad, hard, body)


def _rows_(
    student: torch.Tensor,
    spec: DistillSpec,
    grad_scale: torch.Tensor,
    needs_grad: bool,
    hard: HardLabels | None,
    body: Callable[[torch.Tensor, slice, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]],
) -> torch.Tensor:
    """The frame of both row kernels, block by block: the student's transform, the hard-label term (read before
    ``body`` may overwrite the logits), ``body(u, rows, coefficient) -> (D, coefficient · ∂D/∂z or None)`` with
    ``coefficient = grad_scale · T`` (``∂(T² D)/∂u = T ∂D/∂z``), and the chain rule back to the head's outputs."""
    temperature = spec.temperature
    losses = torch.empty(student.shape[0], dtype=accumulation_dtype(student.dtype), device=student.device)

    def block_(rows: slice) -> None:
        u, tanh = transformed(student[rows], spec.logit_scale, spec.softcap)
        hard_loss = hard_grad = None
        if hard is not None:
            hard_loss, hard_grad = _hard_terms(u, hard, rows, grad_scale[rows] if needs_grad else None)
        coefficient = (grad_scale[rows] * temperature).unsqueeze(1) if needs_grad else None
        loss, grad_u = body(u, rows, coefficient)
        loss = loss * temperature**2
        losses[rows] = loss if hard_loss is None else loss + hard_loss
        if grad_u is not None:
            if hard_grad is not None:
                grad_u.add_(hard_grad)
            _finish_(student[rows], grad_u, spec, tanh)

    _for_each_row_block(student, block_)
    return losses


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of ``(B, V)`` blocks, ``(B,)``. For a CPU block of a few rows, the diagonal of one
    ``B × B`` GEMM: B times the products, at the GEMM's rate, is half the time of ``vecdot`` (which multiplies, then
    sums) and a tenth of ``bmm``'s."""
    if x.shape[0] <= 32:
        return torch.mm(x, y.t()).diagonal()
    return cast(torch.Tensor, torch.linalg.vecdot(x, y))


def _log_probs_(z: torch.Tensor, temperature: float, clamp: bool) -> torch.Tensor:
    """``log_softmax(z / T)`` in place (one fused pass), clamped at the dtype's lowest number with ``clamp`` (a
    ``-inf`` logit's log-probability is ``-inf`` otherwise)."""
    if temperature != 1.0:
        z.mul_(1.0 / temperature)  # a multiplication: twice as fast as a division on the CPU
    torch._log_softmax(z, 1, False, out=z)
    return z.clamp_(min=torch.finfo(z.dtype).min) if clamp else z


def _divergence_(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    p: torch.Tensor,
    divergence: str,
    beta: float,
    coefficient: torch.Tensor | None,
) -> torch.Tensor:
    """``D (B,)`` of a block, ``p = e^log_p``; with ``coefficient (B, 1)``, ``coefficient · ∂D/∂z`` written over
    ``log_p``. ``log_q`` is overwritten."""
    if divergence == "forward_kl":
        q = log_q.exp()
        loss = _dot(q, log_q.sub_(log_p))  # Σ q (log q − log p)
        if coefficient is not None:
            torch.sub(p, q, out=log_p).mul_(coefficient)  # p − q
        return loss
    if divergence == "reverse_kl":
        gap = log_q.neg_().add_(log_p)  # log p − log q (in place: a third operand costs a pass)
        loss = _dot(p, gap)
        if coefficient is not None:  # p (log p − log q − KL)
            torch.mul(_shifted_(gap, loss, coefficient), p, out=log_p)
        return loss
    q = log_q.exp()
    log_m = torch.mul(p, 1.0 - beta).add_(q, alpha=beta).clamp_(min=torch.finfo(p.dtype).tiny).log_()
    kl_teacher = _dot(q, log_q.sub_(log_m))  # Σ q (log q − log m)
    gap = log_m.neg_().add_(log_p)  # log p − log m
    kl_student = _dot(p, gap)
    if coefficient is not None:  # (1 − β) p (log p − log m − KL(p ‖ m))
        torch.mul(_shifted_(gap, kl_student, coefficient * (1.0 - beta)), p, out=log_p)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def _shifted_(x: torch.Tensor, shift: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """``coefficient · (x − shift)`` in place, per row (``shift (B,)``, ``coefficient (B, 1)``): two one-operand
    passes, faster than ``addcmul``'s one pass over three operands."""
    return x.sub_(shift.unsqueeze(1)).mul_(coefficient)


def _hard_terms(
    u: torch.Tensor, hard: HardLabels, rows: slice, grad_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The hard-label term of a block of logits ``u`` (read only): its losses ``(B,)`` and, given the rows'
    ``grad_scale``, its gradient ``grad_scale · weight · (softmax(u) − e_y)``."""
    target = hard.target[rows].unsqueeze(1)
    weight = hard.weight[rows]
    log_p = u - torch.logsumexp(u, dim=1, keepdim=True)
    losses = -weight * log_p.gather(1, target).squeeze(1)
    if grad_scale is None:
        return losses, None
    coefficient = (weight * grad_scale).unsqueeze(1)
    return losses, log_p.exp_().mul_(coefficient).scatter_add_(1, target, -coefficient)


def top_k_rows_(
    student: torch.Tensor,
    indices: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    spec: DistillSpec,
    grad_scale: torch.Tensor,
    needs_grad: bool,
    entropy: torch.Tensor | None,
    hard: HardLabels | None = None,
) -> torch.Tensor:
    """As :func:`dense_rows_` for a top-k teacher: ``indices (c, k)`` its support, ``teacher (c, k + 1)`` its
    categories' log-probabilities (:func:`xent.core.divergence.teacher_categories`), ``valid (c, k)`` False at
    padding entries (whose ids are not read)."""
    temperature = spec.temperature
    support_ids, any_valid, first_valid = _support(indices, valid)

    def body(
        u: torch.Tensor, rows: slice, coefficient: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = u / temperature
        lse = torch.logsumexp(z, dim=1)
        ids = support_ids[rows]
        block_valid = valid[rows]
        support = z.gather(1, ids)
        # the tail: the support's columns masked (a row without support masks nothing: it writes z back)
        masked = z.scatter(1, ids, torch.where(any_valid[rows].unsqueeze(1), -math.inf, support))
        lse_tail = torch.logsumexp(masked, dim=1)
        if entropy is not None:
            entropy[rows] = _entropy(z - lse.unsqueeze(1))
        parts = math_.top_k_rows(
            support, lse, lse_tail, teacher[rows], block_valid, spec.divergence, spec.beta, spec.tail
        )
        if coefficient is None:
            return parts.loss, None
        # classes of the tail: c e^(z − lse_tail); the support's: their own gradient (a padding entry repeats its
        # row's first valid entry, or, in a row without support, writes the tail's value back)
        finite_tail = torch.where(lse_tail == -math.inf, torch.zeros_like(lse_tail), lse_tail)
        grad_z = masked.sub_(finite_tail.unsqueeze(1)).exp_().mul_(parts.tail_coefficient.unsqueeze(1))
        repeated = parts.support_gradient.gather(1, first_valid[rows])
        values = torch.where(block_valid, parts.support_gradient, repeated)
        values = torch.where(any_valid[rows].unsqueeze(1), values, grad_z.gather(1, ids))
        return parts.loss, grad_z.scatter_(1, ids, values).mul_(coefficient)

    return _rows_(student, spec, grad_scale, needs_grad, hard, body)


def _support(indices: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, any_valid (c,), first_valid (c, 1))``: the support's ids with each padding entry replaced by its
    row's first valid id (0 in a row without any), whether each row has a support, and where its first valid entry
    is."""
    any_valid = valid.any(dim=1)
    first_valid = valid.to(torch.int8).argmax(dim=1, keepdim=True)
    fill = indices.gather(1, first_valid)
    fill = torch.where(any_valid.unsqueeze(1), fill, torch.zeros_like(fill))
    return torch.where(valid, indices, fill), any_valid, first_valid


def _for_each_row_block(logits: torch.Tensor, block_: Callable[[slice], None]) -> None:
    num_rows, vocab_size = logits.shape
    # a few block-sized temporaries live at once: blocks of a quarter of the cross-entropy kernel's
    rows = max(1, chunked.rows_per_block(vocab_size, logits.device) // 4)
    for_each_block(num_rows, rows, block_, logits.device)


RowsKernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DenseTeacher:
    """A teacher given by its head: hidden states ``(N, D_t)``, weight ``(V, D_t)``, bias ``(V,)`` or None."""

    input: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class TopKTeacher:
    """A teacher given by its top-k: ``indices (N, k)``, categories ``(N, k + 1)``, ``valid (N, k)``."""

    indices: torch.Tensor
    categories: torch.Tensor
    valid: torch.Tensor


def distillation_chunk_loss(
    teacher: DenseTeacher | TopKTeacher,
    spec: DistillSpec,
    factor: torch.Tensor,
    kept: torch.Tensor,
    hard: HardLabels | None,
    entropy: torch.Tensor | None,
    kernels: tuple[RowsKernel, RowsKernel] = (dense_rows_, top_k_rows_),
) -> ChunkLoss:
    """The chunk loss ``factor · (T² D + hard term)`` of each kept token, 0 for the others.

    Args:
        teacher: the teacher's head or top-k.
        spec: the divergence and the transforms.
        factor: ``()`` the factor of every token's loss (``1 / n`` for a mean, 1 for a sum).
        kept: ``(N,)`` bool, the tokens that count.
        hard: the hard-label term (its weights already 0 at ignored tokens), or None.
        entropy: ``(N,)`` written with the student's entropy (0 at ignored tokens), or None.
        kernels: ``(dense, top_k)`` row kernels (:func:`dense_rows_`, :func:`top_k_rows_` or their Triton twins).
    """
    dense_kernel, top_k_kernel = kernels
    teacher_chunk: list[torch.Tensor] = []

    def chunk_loss(logits: torch.Tensor, rows: slice, grad_scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        row_kept = kept[rows]
        weight = torch.where(row_kept, factor, torch.zeros_like(factor))
        scale = grad_scale * weight
        chunk_entropy = None if entropy is None else entropy[rows]
        chunk_hard = None if hard is None else HardLabels(hard.target[rows], hard.weight[rows])
        if isinstance(teacher, DenseTeacher):
            with torch.no_grad():  # an ignored token's hidden state is read as zeros, as fused_pass does the student's
                hidden = teacher.input[rows]
                hidden = torch.where(row_kept.unsqueeze(1), hidden, torch.zeros((), dtype=hidden.dtype))
                if not teacher_chunk or teacher_chunk[0].shape[0] < hidden.shape[0]:  # one teacher chunk, reused
                    shape = (hidden.shape[0], teacher.weight.shape[0])
                    teacher_chunk[:] = [buffers.empty(shape, hidden.dtype, hidden.device)]
                teacher_logits = teacher_chunk[0][: hidden.shape[0]]
                if teacher.bias is None:
                    torch.mm(hidden, teacher.weight.t(), out=teacher_logits)
                else:
                    torch.addmm(teacher.bias, hidden, teacher.weight.t(), out=teacher_logits)
            losses = dense_kernel(logits, teacher_logits, spec, scale, needs_grad, chunk_entropy, hard=chunk_hard)
        else:
            losses = top_k_kernel(
                logits,
                teacher.indices[rows],
                teacher.categories[rows],
                teacher.valid[rows],
                spec,
                scale,
                needs_grad,
                chunk_entropy,
                hard=chunk_hard,
            )
        if chunk_entropy is not None:
            chunk_entropy.masked_fill_(~row_kept, 0.0)
        # masked, not multiplied: an ignored token's loss may be NaN (its teacher's row is read as it is)
        return torch.where(row_kept, losses * factor, torch.zeros_like(losses))

    return chunk_loss
