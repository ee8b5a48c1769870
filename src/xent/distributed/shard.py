"""The row computation of a vocab-parallel loss on one rank's shard of the vocabulary: the rank's columns, the row
statistics reduced across ranks between :mod:`xent.core.rows`' transform and its algebra, and the autograd Functions
of the two losses (on logits, and on a weight-sharded linear head over :func:`xent.kernels.linear.fused_pass`).
:mod:`xent.distributed.vocab_parallel` checks the arguments, agrees on them across ranks and calls these."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.distributed as dist

from xent.core import rows
from xent.core.reduce import accumulation_dtype
from xent.core.rowloss import RowLoss
from xent.kernels.linear import cast_grads, fused_pass, new_grads


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """The rank's slice of the vocabulary and the loss's description (per-class tensors of the whole vocabulary)."""

    group: Any
    offset: int
    size: int
    vocab: int
    options: RowLoss

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.size)


def target_weight_of(
    target: torch.Tensor, weight: torch.Tensor | None, shard: VocabShard, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_y (M,), W = Σ_c w_c)`` of the whole vocabulary in the accumulation dtype, 0 for ignored rows;
    all-reduced when weighted."""
    dtype = accumulation_dtype(dtype)
    valid = target != shard.options.ignore_index
    if weight is None:
        return valid.to(dtype), torch.tensor(float(shard.vocab), dtype=dtype, device=target.device)
    local, inside = local_target(target, shard)
    picked = torch.where(inside, weight.to(dtype)[local], torch.zeros((), dtype=dtype, device=weight.device))
    totals = torch.cat([picked, weight.to(dtype).sum().view(1)])
    dist.all_reduce(totals, group=shard.group)
    return totals[:-1], totals[-1]


def local_target(target: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """``(column in the shard, clamped to a valid one; whether the rank holds it)`` of each row's target."""
    local = target - shard.offset
    inside = (target != shard.options.ignore_index) & (local >= 0) & (local < shard.size)
    return torch.where(inside, local, torch.zeros_like(local)), inside


def transformed(
    logits: torch.Tensor, target: torch.Tensor, shard: VocabShard, scratch: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(z, tanh(x / c))`` of a block of the shard's logits in the accumulation dtype (:func:`xent.core.rows.transform`
    of the rank's columns). ``z`` is the callers' to overwrite: formed in ``logits`` itself when they are ``scratch``
    (a chunk of a linear head), else in a new tensor."""
    options = shard.options
    x = logits.to(accumulation_dtype(logits.dtype))
    target_column = margin = None
    if options.target_margin is not None:
        local, inside = local_target(target, shard)
        margin = options.target_margin.to(device=x.device, dtype=x.dtype)[in_vocabulary(target, shard)] * inside
        target_column, margin = local.unsqueeze(1), margin.unsqueeze(1)
    owned = scratch or x is not logits
    z, tanh = rows.transform(
        x, options, classes=shard.columns, target_column=target_column, margin=margin, in_place=owned
    )
    return (z.clone() if z is logits and not scratch else z), tanh


def target_rows_of(
    target: torch.Tensor, target_weight: torch.Tensor, total_weight: torch.Tensor, shard: VocabShard
) -> rows.TargetRows:
    """The row algebra's per-row weights (:class:`xent.core.rows.TargetRows`) of a block of rows."""
    valid = (target != shard.options.ignore_index).to(target_weight.dtype)
    alpha = shard.options.alpha
    main_weight = target_weight
    if alpha is not None:
        main_weight = (
            target_weight * alpha.to(device=target.device, dtype=target_weight.dtype)[in_vocabulary(target, shard)]
        )
    return rows.TargetRows(valid, target_weight, main_weight, total_weight)


def in_vocabulary(target: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Each row's target where it is a class of the vocabulary, 0 elsewhere (ignored rows, and — value checks off —
    targets outside ``[0, V)``, whose rows are NaN): an index that is safe to read a per-class tensor at."""
    inside = (target >= 0) & (target < shard.vocab)
    return torch.where(inside, target, torch.zeros_like(target))


def row_losses(
    z: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    target_rows: rows.TargetRows,
    shard: VocabShard,
) -> tuple[torch.Tensor, ...]:
    """``(losses, lse, u)`` of rows whose transformed shard is ``z (B, V_r)`` (overwritten): the shard's statistics,
    two all-reduces, then :func:`xent.core.rows.row_losses`. A row whose target no shard holds (outside ``[0, V)``,
    which only value checks catch up front) gets NaN for its loss and ``u``: the shards holding each target are
    counted in the second all-reduce, with no host sync."""
    options = shard.options
    row_max = z.amax(dim=1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shard.group)
    local, inside = local_target(target, shard)
    smooth = torch.zeros_like(row_max)  # Σ_c w_c z_c, which label smoothing reads
    if options.label_smoothing:
        smooth = z.sum(dim=1) if weight is None else z @ weight.to(z.dtype)
    target_logit = torch.where(inside, z.gather(1, local.unsqueeze(1)).squeeze(1), 0.0)
    sum_exp = z.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)  # in place: z is not read again
    sums = torch.stack([sum_exp, target_logit, smooth, inside.to(sum_exp.dtype)])
    dist.all_reduce(sums, group=shard.group)
    sum_exp, target_logit, smooth, holders = sums
    lse = row_max + torch.log(sum_exp)
    valid = target != options.ignore_index
    unheld = valid & (holders == 0)  # its target's logit was taken as 0: a finite, wrong loss without this
    u = torch.where(unheld, torch.nan, target_logit - lse)
    loss = rows.row_losses(u, lse, smooth, target_rows, options, shard.vocab)
    loss = torch.where(unheld, torch.nan, loss)  # whatever the loss's ψ makes of NaN, and 0 × NaN of a 0 weight
    return torch.where(valid, loss, torch.zeros_like(loss)), lse, u


def row_gradient_(
    z: torch.Tensor,
    tanh: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    target_rows: rows.TargetRows,
    lse: torch.Tensor,
    u: torch.Tensor,
    grad_rows: torch.Tensor,
    shard: VocabShard,
) -> torch.Tensor:
    """``∂(Σ g_n loss_n)/∂logits`` of the shard, formed over ``z`` (overwritten) from the coefficients of
    :func:`xent.core.rows.gradient_coefficients`."""
    options = shard.options
    eps = options.label_smoothing
    scale = torch.where(target != options.ignore_index, grad_rows.to(z.dtype), torch.zeros_like(lse))
    u = torch.where(scale != 0, u, 0.0)  # a NaN row (no shard holds its target) whose loss is unused: gradient 0
    coefficient, slope = rows.gradient_coefficients(u, lse, target_rows, options, shard.vocab)
    coefficient = torch.where(u.isnan(), torch.nan, coefficient)  # ψ' may be constant (−1 for cross-entropy)
    grad = z.sub_(lse.unsqueeze(1)).exp_().mul_((coefficient * scale).unsqueeze(1))  # p_c · a · g_n
    local, inside = local_target(target, shard)
    grad.scatter_add_(1, local.unsqueeze(1), (slope * scale * inside).unsqueeze(1))
    if eps:
        per_class = torch.ones(shard.size, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)
        grad.sub_((eps / shard.vocab) * scale.unsqueeze(1) * per_class)
    if options.logit_scale != 1.0:
        grad.mul_(options.logit_scale)
    if tanh is not None:
        grad.mul_(1.0 - tanh.square())
    # an ignored row is absent whatever it holds: NaN or ±inf there makes its softmax NaN, which a zero scale cannot
    # cancel (0 · NaN)
    return grad.masked_fill_((target == options.ignore_index).unsqueeze(1), 0.0)


@dataclasses.dataclass(frozen=True)
class ShardCall:
    """What a vocab-parallel Function runs, beside the tensors it differentiates: the shard and its description, the
    canonical target, the rank's class weights, the rows' weights (:class:`xent.core.rows.TargetRows`) and, for a
    linear head, the tokens per chunk every rank uses."""

    shard: VocabShard
    target: torch.Tensor
    weight: torch.Tensor | None
    target_rows: rows.TargetRows
    chunk: int = 0


class ShardRows(torch.autograd.Function):
    """Per-row losses of a logits shard; backward forms the shard's gradient locally from the saved ``lse``, ``u``."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, call: ShardCall) -> torch.Tensor:
        z, _ = transformed(logits, call.target, call.shard, scratch=False)
        losses, lse, u = row_losses(z, call.target, call.weight, call.target_rows, call.shard)
        ctx.call = call
        ctx.save_for_backward(logits, lse, u)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        refuse_second_order()
        logits, lse, u = ctx.saved_tensors
        call: ShardCall = ctx.call
        z, tanh = transformed(logits, call.target, call.shard, scratch=False)
        grad = row_gradient_(z, tanh, call.target, call.weight, call.target_rows, lse, u, grad_rows, call.shard)
        return grad.to(logits.dtype), None


class ShardLinearRows(torch.autograd.Function):
    """Per-row losses of a weight-sharded head, by the linear heads' chunk driver
    (:func:`xent.kernels.linear.fused_pass`): forward runs the row statistics' all-reduces chunk by chunk; backward
    recomputes each chunk's logits, forms their gradient locally and all-reduces ``d(input)`` once."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        linear_bias: torch.Tensor | None,
        call: ShardCall,
    ) -> torch.Tensor:
        dtype = accumulation_dtype(input.dtype)
        shard, target, target_rows = call.shard, call.target, call.target_rows
        lse, u = (torch.empty(input.shape[0], dtype=dtype, device=input.device) for _ in range(2))

        def chunk_losses(logits: torch.Tensor, block: slice, scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
            z, _ = transformed(logits, target[block], shard, scratch=True)
            losses, lse[block], u[block] = row_losses(z, target[block], call.weight, target_rows[block], shard)
            return losses

        kept = target != shard.options.ignore_index  # absent, whatever their hidden states hold
        ones = torch.ones(input.shape[0], dtype=dtype, device=input.device)
        losses = fused_pass(input, linear_weight, linear_bias, chunk_losses, ones, call.chunk, (None,) * 3, kept)
        ctx.call, ctx.kept = call, kept
        ctx.save_for_backward(input, linear_weight, linear_bias, lse, u)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        refuse_second_order()
        input, linear_weight, linear_bias, lse, u = ctx.saved_tensors
        call: ShardCall = ctx.call
        shard, target, target_rows = call.shard, call.target, call.target_rows

        def chunk_gradient(logits: torch.Tensor, block: slice, scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
            z, tanh = transformed(logits, target[block], shard, scratch=True)
            grad = row_gradient_(z, tanh, target[block], call.weight, target_rows[block], lse[block], u[block],
                                  scale, shard)  # fmt: skip
            if grad.data_ptr() != logits.data_ptr():
                logits.copy_(grad)
            return cast(torch.Tensor, lse[block])  # the losses are forward's: a placeholder of the right shape

        accumulate = accumulation_dtype(linear_weight.dtype)
        grads = new_grads(input, linear_weight, linear_bias, ctx.needs_input_grad[:3], accumulate)
        fused_pass(input, linear_weight, linear_bias, chunk_gradient, grad_rows, call.chunk, grads, ctx.kept)
        grad_input, grad_weight, grad_bias = cast_grads(grads, input, linear_weight, linear_bias)
        if grad_input is not None:
            dist.all_reduce(grad_input, group=shard.group)  # every rank's classes contribute to d(input)
        return grad_input, grad_weight, grad_bias, None


def refuse_second_order() -> None:
    """The gradients are formed without a graph: differentiating them again would silently give nothing."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the vocab-parallel losses form their gradient without a graph and cannot be differentiated twice "
            "(create_graph=True); gather the logits and use xent's loss with impl='reference' for second order"
        )
