"""The rows of a vocab-parallel distillation loss on one rank's shard of the vocabulary: the shard's statistics, the
all-reduces between them and :mod:`xent.core.divergence`'s math, and the autograd Functions of the two losses (on
logits shards, and on weight-sharded student and teacher heads over :func:`xent.kernels.linear.fused_pass`).
:mod:`xent.distributed.divergence` checks the arguments, agrees on them across ranks and calls these.

A block of ``B`` rows, ``u = s · cap(x)`` the student's logits on the rank's ``V_r`` columns and ``z = u / T``::

    max     all_reduce_max  [max z, max z_t]                  dense teacher: its logits z_t = u_t / T
                            [max z, max_{j ∉ S} z_j]           top-k teacher: S its support (k ids per row)
    sums    all_reduce_sum  [Σ e^(z − m), Σ e^(z_t − m_t)]     dense
                            [Σ e^(z − m), Σ_{j ∉ S} e^(z_j − m'), z_S]     top-k: each rank's z at the ids it holds
                            + [Σ e^(u − T m), u_y, holders of y]           the hard term (at T = 1), when weighted
                            + [Σ e^(z − m) (z − m)]                        the entropy, when asked for
    dense   all_reduce_sum  [Σ_j terms_j, Σ_j slopes_j]        of divergence_terms(z − lse, z_t − lse_t)
    top-k   top_k_rows(z_S, lse, lse_tail, …) on every rank, no communication

so a block costs the rank 2B + 2B (+ 3B, + B) + 2B numbers with a dense teacher, 2B + (2 + k)B (+ 3B, + B) with a
top-k one. The gradient of the shard is local, from the saved per-row numbers: with a dense teacher
``T (slopes_j − p_j Σ slopes)``, with a top-k one the support's gradient at the support's columns and ``c e^(z_j −
lse_tail)`` elsewhere (:class:`xent.core.divergence.TopKRows`); plus ``λ (softmax(u)_j − [j = y])`` for the hard
term, then the chain rule through the student's transform.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from xent.core import divergence as math_
from xent.core.reduce import accumulation_dtype
from xent.distributed.shard import refuse_second_order
from xent.kernels.distill import DistillSpec, transformed
from xent.kernels.linear import cast_grads, fused_pass, new_grads


@dataclasses.dataclass(frozen=True)
class DistillShard:
    """The rank's slice of the vocabulary and what the loss computes."""

    group: Any
    offset: int
    size: int
    vocab: int
    spec: DistillSpec
    hard_weight: float


@dataclasses.dataclass(frozen=True)
class TopK:
    """A top-k teacher, ``(N, k)`` each but ``categories (N, k + 1)``, as :func:`xent.losses.teachers.top_k_teacher`
    lays it out (ignored rows given a stand-in, padding ids 0)."""

    ids: torch.Tensor
    categories: torch.Tensor
    valid: torch.Tensor


@dataclasses.dataclass(frozen=True)
class DistillCall:
    """What a vocab-parallel distillation Function runs, beside the tensors it differentiates: the shard, the rows
    that count, the hard term's target (None: no hard term), a top-k teacher (None: a dense one), rows to poison with
    NaN (a top-k id outside the vocabulary, value checks off), whether to compute the entropy, tokens per chunk."""

    shard: DistillShard
    kept: torch.Tensor
    target: torch.Tensor | None
    top_k: TopK | None
    poisoned: torch.Tensor | None
    entropy: bool = False
    chunk: int = 0


@dataclasses.dataclass(frozen=True)
class RowStats:
    """What forward saves per row for backward: the student's ``lse`` at T; the teacher's (dense) or the student's
    tail's (top-k) ``other``; ``Σ slopes`` (dense) or the tail coefficient (top-k); the student's ``lse`` at T = 1
    (hard term); the support's gradient (top-k, ``(N, k)``)."""

    lse: torch.Tensor
    other: torch.Tensor
    coefficient: torch.Tensor
    hard_lse: torch.Tensor
    support: torch.Tensor | None

    @staticmethod
    def empty(rows: int, call: DistillCall, like: torch.Tensor) -> RowStats:
        dtype = accumulation_dtype(like.dtype)
        lse, other, coefficient, hard_lse = (torch.empty(rows, dtype=dtype, device=like.device) for _ in range(4))
        support = None
        if call.top_k is not None:
            support = torch.empty(rows, call.top_k.ids.shape[1], dtype=dtype, device=like.device)
        return RowStats(lse, other, coefficient, hard_lse, support)

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.lse, self.other, self.coefficient, self.hard_lse, self.support


def _finite(x: torch.Tensor) -> torch.Tensor:
    """A shift for ``exp``: ``-inf`` (every logit masked) and NaN become 0, so that the shifted sum stays 0 / NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _support_columns(top_k: TopK, rows: slice, shard: DistillShard, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(column in the shard, clamped to a valid one (B, k); whether the rank holds it (B, k); the shard's support
    mask (B, V_r))`` of a block of rows of a top-k teacher."""
    local = top_k.ids[rows] - shard.offset
    inside = top_k.valid[rows] & (local >= 0) & (local < shard.size)
    local = torch.where(inside, local, torch.zeros_like(local))
    # counts, not a boolean scatter: the clamped entries write into column 0 as well, and must not unmark it
    counts = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    return local, inside, counts.scatter_add_(1, local, inside.to(like.dtype)) > 0


def _target_column(target: torch.Tensor, kept: torch.Tensor, shard: DistillShard) -> tuple[torch.Tensor, ...]:
    local = target - shard.offset
    inside = kept & (local >= 0) & (local < shard.size)
    return torch.where(inside, local, torch.zeros_like(local)).unsqueeze(1), inside


def block_losses(
    u: torch.Tensor,
    teacher_u: torch.Tensor | None,
    rows: slice,
    call: DistillCall,
    stats: RowStats,
    entropy: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row losses ``T² D + λ CE`` (0 at rows that do not count) of a block whose transformed student logits on
    the shard are ``u (B, V_r)`` (read only) and, with a dense teacher, the teacher's ``teacher_u``; its row
    statistics into ``stats[rows]``, the student's entropy at T into ``entropy[rows]`` when given."""
    shard, spec = call.shard, call.shard.spec
    temperature, kept = spec.temperature, call.kept[rows]
    z = u / temperature
    if call.top_k is not None:
        local, inside, in_support = _support_columns(call.top_k, rows, shard, z)
        other = z.masked_fill(in_support, -math.inf)  # the tail's logits
    else:
        other = teacher_u.to(z.dtype) / temperature if teacher_u is not None else z
    maxima = torch.stack([z.amax(dim=1), other.amax(dim=1)])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=shard.group)
    top, other_top = _finite(maxima)
    exp_z = (z - top.unsqueeze(1)).exp()
    columns = [exp_z.sum(dim=1, keepdim=True), (other - other_top.unsqueeze(1)).exp().sum(dim=1, keepdim=True)]
    if call.top_k is not None:
        columns.append(torch.where(inside, z.gather(1, local), torch.zeros((), dtype=z.dtype, device=z.device)))
    if call.target is not None:
        target_local, holds = _target_column(call.target[rows], kept, shard)
        target_logit = torch.where(holds, u.gather(1, target_local).squeeze(1), 0.0)
        hard_sum = (u - (temperature * top).unsqueeze(1)).exp().sum(dim=1)
        columns.append(torch.stack([hard_sum, target_logit, holds.to(u.dtype)], dim=1))
    if entropy is not None:  # Σ e^(z − m) (z − m), 0 where e^(z − m) = 0 (z = -inf); shifted: no cancellation
        shifted = exp_z * (z - top.unsqueeze(1))
        columns.append(torch.where(exp_z > 0, shifted, 0.0).sum(dim=1, keepdim=True))
    sums = torch.cat(columns, dim=1)
    dist.all_reduce(sums, group=shard.group)
    lse = top + torch.log(sums[:, 0])
    other_lse = other_top + torch.log(sums[:, 1])
    stats.lse[rows], stats.other[rows] = lse, other_lse
    if call.top_k is not None:
        k = call.top_k.ids.shape[1]
        parts = math_.top_k_rows(sums[:, 2 : 2 + k], lse, other_lse, call.top_k.categories[rows],
                                 call.top_k.valid[rows], spec.divergence, spec.beta, spec.tail)  # fmt: skip
        divergence, stats.coefficient[rows] = parts.loss, parts.tail_coefficient
        if stats.support is not None:
            stats.support[rows] = parts.support_gradient
        used = 2 + k
    else:
        terms, slopes = math_.divergence_terms(z - lse.unsqueeze(1), other - other_lse.unsqueeze(1),
                                               spec.divergence, spec.beta)  # fmt: skip
        totals = torch.stack([terms.sum(dim=1), slopes.sum(dim=1)])
        dist.all_reduce(totals, group=shard.group)
        divergence, stats.coefficient[rows] = totals[0], totals[1]
        used = 2
    loss = temperature**2 * divergence
    if call.target is not None:
        hard_sum, target_logit, holders = sums[:, used : used + 3].unbind(dim=1)
        hard_lse = temperature * top + torch.log(hard_sum)
        stats.hard_lse[rows] = hard_lse
        # a target no shard holds (outside [0, V), value checks off): NaN, never a finite wrong loss
        cross_entropy = torch.where(holders == 0, math.nan, hard_lse - target_logit)
        loss = loss + shard.hard_weight * cross_entropy
        used += 3
    if call.poisoned is not None:
        loss = torch.where(call.poisoned[rows], math.nan, loss)
    if entropy is not None:
        entropy[rows] = torch.where(kept, torch.log(sums[:, 0]) - sums[:, used] / sums[:, 0], 0.0)
    return torch.where(kept, loss, 0.0)  # masked, not multiplied: an ignored row may hold NaN


def block_gradient(
    u: torch.Tensor,
    tanh: torch.Tensor | None,
    teacher_u: torch.Tensor | None,
    rows: slice,
    call: DistillCall,
    stats: RowStats,
    grad_rows: torch.Tensor,
) -> torch.Tensor:
    """``∂(Σ g_n loss_n)/∂x`` of the block's raw logits ``x`` on the shard (a new tensor), from the transformed
    ``u`` (read only), the cap's ``tanh``, and the per-row numbers forward saved."""
    shard, spec = call.shard, call.shard.spec
    temperature, kept = spec.temperature, call.kept[rows]
    lse = stats.lse[rows].unsqueeze(1)
    z = u / temperature
    if call.top_k is not None:
        local, inside, in_support = _support_columns(call.top_k, rows, shard, z)
        tail_lse = _finite(stats.other[rows]).unsqueeze(1)  # no tail: its coefficient is 0, and so is e^(-inf)
        grad = z.sub_(tail_lse).exp_().mul_(stats.coefficient[rows].unsqueeze(1)).masked_fill_(in_support, 0.0)
        if stats.support is not None:
            grad.scatter_add_(1, local, torch.where(inside, stats.support[rows], 0.0))
    else:
        teacher = teacher_u.to(z.dtype) / temperature if teacher_u is not None else z
        log_p = z.sub_(lse)
        _, slopes = math_.divergence_terms(log_p, teacher - stats.other[rows].unsqueeze(1), spec.divergence, spec.beta)
        grad = slopes.sub_(log_p.exp_().mul_(stats.coefficient[rows].unsqueeze(1)))
    grad.mul_(temperature)  # ∂(T² D)/∂u = T ∂D/∂z
    if call.target is not None:
        grad.add_((u - stats.hard_lse[rows].unsqueeze(1)).exp_().mul_(shard.hard_weight))
        target_local, holds = _target_column(call.target[rows], kept, shard)
        grad.scatter_add_(1, target_local, (holds.to(grad.dtype) * -shard.hard_weight).unsqueeze(1))
    scale = torch.where(kept, grad_rows.to(grad.dtype), 0.0)
    grad.mul_(scale.unsqueeze(1))
    if tanh is not None:
        grad.mul_(1.0 - tanh.square())
    if spec.logit_scale != 1.0:
        grad.mul_(spec.logit_scale)
    # an unused or ignored row is absent whatever it holds (0 · NaN would not be)
    return grad.masked_fill_((scale == 0).unsqueeze(1), 0.0)


class DistillShardRows(torch.autograd.Function):
    """Per-row losses of a student's logits shard against a teacher's shard or top-k; backward forms the shard's
    gradient locally from the saved row statistics."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor | None, call: DistillCall) -> torch.Tensor:
        u = student.to(accumulation_dtype(student.dtype))  # read only: it may be the caller's tensor
        teacher_u = None if teacher is None else teacher.to(u.dtype)
        stats = RowStats.empty(student.shape[0], call, student)
        losses = block_losses(u, teacher_u, slice(None), call, stats, None)
        ctx.call = call
        ctx.save_for_backward(student, teacher, *stats.tensors())
        return losses

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        refuse_second_order()
        student, teacher, *saved = ctx.saved_tensors
        u = student.to(accumulation_dtype(student.dtype))
        teacher_u = None if teacher is None else teacher.to(u.dtype)
        grad = block_gradient(u, None, teacher_u, slice(None), ctx.call, RowStats(*saved), grad_rows)
        return grad.to(student.dtype), None, None


class DistillShardLinearRows(torch.autograd.Function):
    """Per-row losses and the student's entropy (not differentiable) of weight-sharded student and teacher heads,
    by the linear heads' chunk driver (:func:`xent.kernels.linear.fused_pass`): forward runs the statistics'
    all-reduces chunk by chunk; backward recomputes each chunk's logits (the teacher's too), forms their gradient
    locally and all-reduces ``d(input)`` once."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        linear_bias: torch.Tensor | None,
        teacher_input: torch.Tensor | None,
        teacher_weight: torch.Tensor | None,
        teacher_bias: torch.Tensor | None,
        call: DistillCall,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        spec, rows = call.shard.spec, input.shape[0]
        stats = RowStats.empty(rows, call, input)
        entropy = torch.zeros(rows if call.entropy else 0, dtype=stats.lse.dtype, device=input.device)
        teacher = (teacher_input, teacher_weight, teacher_bias)

        def chunk_losses(logits: torch.Tensor, block: slice, scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
            u, _ = transformed(logits, spec.logit_scale, spec.softcap)
            teacher_u = _teacher_logits(teacher, block, call)
            return block_losses(u, teacher_u, block, call, stats, entropy if call.entropy else None)

        ones = torch.ones(rows, dtype=stats.lse.dtype, device=input.device)
        losses = fused_pass(input, linear_weight, linear_bias, chunk_losses, ones, call.chunk, (None,) * 3, call.kept)
        ctx.call = call
        ctx.save_for_backward(input, linear_weight, linear_bias, *teacher, *stats.tensors())
        ctx.mark_non_differentiable(entropy)
        return losses, entropy

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        refuse_second_order()
        input, linear_weight, linear_bias, *rest = ctx.saved_tensors
        teacher, stats = tuple(rest[:3]), RowStats(*rest[3:])
        call: DistillCall = ctx.call
        spec = call.shard.spec

        def chunk_gradient(logits: torch.Tensor, block: slice, scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
            u, tanh = transformed(logits, spec.logit_scale, spec.softcap)
            teacher_u = _teacher_logits(teacher, block, call)
            logits.copy_(block_gradient(u, tanh, teacher_u, block, call, stats, scale))
            return stats.lse[block]  # the losses are forward's: a placeholder of the right shape

        grads = new_grads(input, linear_weight, linear_bias, ctx.needs_input_grad[:3],
                          accumulation_dtype(linear_weight.dtype))  # fmt: skip
        fused_pass(input, linear_weight, linear_bias, chunk_gradient, grad_rows, call.chunk, grads, call.kept)
        grad_input, grad_weight, grad_bias = cast_grads(grads, input, linear_weight, linear_bias)
        if grad_input is not None:
            dist.all_reduce(grad_input, group=call.shard.group)  # every rank's classes contribute to d(input)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _teacher_logits(teacher: tuple[torch.Tensor | None, ...], block: slice, call: DistillCall) -> torch.Tensor | None:
    """The teacher's transformed logits on the shard for a chunk of tokens (dense teacher), without gradient; an
    ignored token's hidden state is read as zeros, as :func:`xent.kernels.linear.fused_pass` reads the student's."""
    teacher_input, teacher_weight, teacher_bias = teacher
    if teacher_input is None or teacher_weight is None:
        return None
    spec = call.shard.spec
    with torch.no_grad():
        hidden = teacher_input[block]
        hidden = torch.where(call.kept[block].unsqueeze(1), hidden, torch.zeros((), dtype=hidden.dtype))
        logits = torch.nn.functional.linear(hidden, teacher_weight, teacher_bias)
        return transformed(logits, spec.teacher_logit_scale, spec.teacher_softcap)[0]
