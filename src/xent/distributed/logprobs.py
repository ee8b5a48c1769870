"""Per-token log-probabilities, entropies and the statistics trainers log, of a linear head whose weight is split over
the vocabulary across the ranks of a process group: :func:`xent.linear_token_outputs` without gathering the head or
its logits, as tensor-parallel policies (Megatron's, verl's) hold their output layer.

Rank r holds the rows ``[offset_r, offset_r + V_r)`` of the head; the hidden states and the targets are the same on
every rank. Each chunk of tokens (the same chunks on every rank) is reduced on the rank's columns, and the ranks
all-reduce a few numbers per token (``z = a · cap(L)`` as in :mod:`xent.kernels.logprobs`)::

    z      = a · cap(X W_rᵀ + b_r)              the rank's columns, float32
    m      = all_reduce_max(max_c z)
    first  = all_reduce_min(the first column reaching m, on the ranks that reach it)      top-1 only
    S, T, Q, Σz, z_y, h = all_reduce_sum(Σ_c e^(z−m), Σ_c e^(z−m) (z−m), Σ_c e^(2(z−m)), Σ_c z,
                                          z[y] on the rank that holds y, 1 on that rank)
    log p_y = z_y − m − log S            H = log S − T / S        log Σ p² = log Q − 2 log S
    mean z  = Σz / V                     top-1 = (first == y)      h = 0: y ∉ [0, V), log p_y is NaN

The backward pass recomputes each chunk's columns and forms their gradient locally
(:func:`xent.kernels.logprobs.gradient_block_`, from the saved log-sum-exp and entropy), with no communication but
one all-reduce of ``d(input)``. Before any of it, the agreement step (:mod:`xent.distributed.agreement`) makes a bad
or differing argument raise on every rank alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from xent.core.reduce import accumulation_dtype
from xent.distributed.agreement import Terms, agree
from xent.distributed.shard import refuse_second_order
from xent.distributed.vocab_parallel import check_head_shard, collective_device, group_of
from xent.kernels.linear import cast_grads, default_chunk_size, fused_pass, new_grads
from xent.kernels.logprobs import STATISTICS, HeadTransform, RowOutputs, for_each_row_block, gradient_block_
from xent.losses import checks
from xent.losses.logprobs import TokenOutputs, check_outputs
from xent.losses.teachers import check_logit_scale, check_softcap

__all__ = ["vocab_parallel_linear_log_probs", "vocab_parallel_linear_token_outputs"]


def vocab_parallel_linear_log_probs(
    input: torch.Tensor,
    linear_weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias_shard: torch.Tensor | None = None,
    group: Any = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`xent.linear_log_probs` of a head whose weight is split over the vocabulary across ``group``:
    ``(log_probs, entropy)``, the same on every rank, differentiable as there (``d(input)`` all-reduced,
    ``d(linear_weight_shard)`` the rank's rows of the full gradient).

    Example (on each rank; ``hidden`` and ``tokens`` the same everywhere, ``head_shard`` the rank's rows)::

        log_probs, entropy = vocab_parallel_linear_log_probs(hidden, head_shard, tokens, temperature=0.7)
    """
    outputs = vocab_parallel_linear_token_outputs(
        input, linear_weight_shard, target, linear_bias_shard=linear_bias_shard, group=group,
        temperature=temperature, logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index,
        chunk_size=chunk_size, outputs=("log_probs", "entropy"),
    )  # fmt: skip
    return outputs.log_probs, outputs.entropy  # type: ignore[return-value]  # asked for: a tensor


def vocab_parallel_linear_token_outputs(
    input: torch.Tensor,
    linear_weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias_shard: torch.Tensor | None = None,
    group: Any = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    outputs: Iterable[str] = ("log_probs", "entropy"),
) -> TokenOutputs:
    """:func:`xent.linear_token_outputs` of a head whose weight is split over the vocabulary across ``group``.

    ``input`` is replicated on every rank (as in Megatron-style tensor parallelism); rank r holds the rows
    ``[offset_r, offset_r + V_r)`` of the head's weight (and bias), in rank order, any sizes. Tokens go in chunks,
    each reduced on the rank's columns and its per-token numbers all-reduced (see the module docstring), so no rank
    ever holds more than one chunk of its columns' logits. Every output is the same on every rank.

    Args:
        input: hidden states ``(..., D)``, the same on every rank.
        linear_weight_shard: ``(V_r, D)``, the rank's rows of the head's weight (or a ``DTensor`` sharded on
            dimension 0 of a 1-D mesh, as ``ColwiseParallel`` shards an ``nn.Linear``).
        target: ``(...)`` global class indices or ``ignore_index``, the same on every rank.
        linear_bias_shard: ``(V_r,)`` or ``None``.
        group: the process group (default: the weight's mesh's, else the world).
        temperature, logit_scale, softcap, ignore_index, outputs: as in :func:`xent.linear_token_outputs`.
        chunk_size: tokens per chunk (default as :func:`xent.linear_cross_entropy` on the rank's shard); the ranks
            all use the smallest rank's, so that they run the same number of chunks.

    Returns:
        :class:`xent.TokenOutputs`, as :func:`xent.linear_token_outputs` returns it.

    Raises:
        ValueError, TypeError: as :func:`xent.linear_token_outputs`, on every rank alike; the ranks must also agree
            on the target, the input's shape and dtype and every option.
    """
    group = group_of(linear_weight_shard, group)
    terms = Terms()
    try:  # every local check, its error kept for the agreement step, so that every rank raises it
        linear_weight_shard, linear_bias_shard, target, size = check_head_shard(
            input, linear_weight_shard, linear_bias_shard, target, group
        )
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
        statistics = check_outputs(outputs)
        temperature = checks.check_in_range(
            "temperature", temperature, 0.0, math.inf, low_inclusive=False, high_inclusive=False
        )
        transform = HeadTransform(
            check_logit_scale("logit_scale", logit_scale) / temperature, check_softcap("softcap", softcap)
        )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
        checks.check_chunk_size(chunk_size)
        terms.agreed.update({"input's shape": tuple(input.shape), "input's dtype": input.dtype})
        terms.agreed.update({"temperature": temperature, "logit_scale": float(logit_scale), "softcap": softcap})
        terms.agreed.update({"outputs": ",".join(sorted(statistics)), "ignore_index": ignore_index})
        terms.agreed["target"] = target.long()
        terms.size, terms.target, terms.ignore_index = size, target.reshape(-1).long(), ignore_index
        terms.chunk_size = chunk_size or default_chunk_size(target.numel(), size, input.device)
    except Exception as error:  # whatever it is, every rank must hear of it, or the others hang
        terms.error = error
    agreement = agree(terms, group, collective_device(group, input, target))
    rank = dist.get_rank(group)
    call = _Call(
        group=group,
        offset=sum(agreement.sizes[:rank]),
        vocab=sum(agreement.sizes),
        transform=transform,
        ignore_index=ignore_index,
        chunk=agreement.chunk_size,
        statistics=statistics,
        target=terms.target,  # type: ignore[arg-type]  # checked: the agreement passed
    )
    flat_input = input.reshape(-1, input.shape[-1]).contiguous()
    log_probs, *statistics_ = ShardLinearLogProbs.apply(flat_input, linear_weight_shard, linear_bias_shard, call)
    shaped = (None if value is None else value.view(target.shape) for value in statistics_)
    return TokenOutputs(log_probs.view(target.shape), *shaped)


@dataclasses.dataclass(frozen=True)
class _Call:
    """What :class:`ShardLinearLogProbs` runs beside the tensors it differentiates."""

    group: Any
    offset: int  # the rank's first class
    vocab: int  # V, every rank's classes
    transform: HeadTransform
    ignore_index: int
    chunk: int  # tokens per chunk, the same on every rank
    statistics: frozenset[str]
    target: torch.Tensor  # (N,) int64, global class indices


def _columns(target: torch.Tensor, call: _Call, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(valid (B,), column (B, 1) in the shard, held (B,))``: which rows count, each row's target as a column of
    the rank's shard (0 where the rank does not hold it) and whether it does."""
    valid = target != call.ignore_index
    local = target - call.offset
    held = valid & (local >= 0) & (local < size)
    return valid, torch.where(held, local, torch.zeros_like(local)).unsqueeze(1), held


def _chunk_outputs(z: torch.Tensor, target: torch.Tensor, call: _Call) -> tuple[RowOutputs, torch.Tensor]:
    """The outputs of a chunk's rows whose transformed columns are ``z`` (``(c, V_r)``, overwritten) — those not asked
    for None — and their log-sum-exps."""
    statistics = call.statistics
    valid, column, held = _columns(target, call, z.shape[1])
    local_max = z.amax(dim=1)
    row_max = local_max.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=call.group)
    first = None
    if "is_top1" in statistics:  # the first class reaching the maximum, over the ranks in order
        reached = local_max == row_max
        first = torch.where(reached, z.argmax(dim=1) + call.offset, torch.full_like(target, call.vocab))
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=call.group)
    target_logit = torch.where(held, z.gather(1, column).squeeze(1), torch.zeros_like(row_max))
    z.sub_(row_max.unsqueeze(1))  # z' ≤ 0
    sums = torch.zeros(6, z.shape[0], dtype=z.dtype, device=z.device)  # S, T, Q, Σz', z_y, holders

    def block_(rows: slice) -> None:
        shifted = z[rows]
        if "mean_logits" in statistics:
            sums[3, rows] = shifted.sum(dim=1)
        shifted.clamp_(min=torch.finfo(z.dtype).min)  # a -inf logit: e^z' z' = 0, not NaN, as in the local kernel
        exp = shifted.exp()
        sums[0, rows] = exp.sum(dim=1)
        if "log_sum_sq_probs" in statistics:
            sums[2, rows] = torch.linalg.vector_norm(exp, dim=1).square_()
        if "entropy" in statistics:
            sums[1, rows] = exp.mul_(shifted).sum(dim=1)

    for_each_row_block(z, block_)
    sums[4], sums[5] = target_logit, held.to(z.dtype)
    dist.all_reduce(sums, group=call.group)
    total, weighted, squares, shifted_sum, target_logit, holders = sums
    log_total = total.log()
    unheld = valid & (holders == 0)  # a target outside [0, V) (value checks off): NaN, not a wrong number
    log_probs = torch.where(valid, target_logit - row_max - log_total, torch.zeros_like(log_total))
    log_probs = torch.where(unheld, torch.nan, log_probs)
    entropy = log_total - weighted / total if "entropy" in statistics else None
    log_sum_sq = squares.log() - 2 * log_total if "log_sum_sq_probs" in statistics else None
    mean = shifted_sum / call.vocab + row_max if "mean_logits" in statistics else None
    top1 = (first == target) & valid if first is not None else None
    return RowOutputs(log_probs, entropy, log_sum_sq, mean, top1), row_max + log_total


class ShardLinearLogProbs(torch.autograd.Function):
    """The outputs of :func:`vocab_parallel_linear_token_outputs` of canonical tensors, by the linear heads' chunk
    driver (:func:`xent.kernels.linear.fused_pass`): forward all-reduces each chunk's row statistics; backward
    recomputes each chunk's columns, forms their gradient locally and all-reduces ``d(input)`` once."""

    @staticmethod
    def forward(
        ctx: Any, input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None, call: _Call
    ) -> tuple[torch.Tensor | None, ...]:
        ctx.set_materialize_grads(False)  # an unused output's grad_output arrives as None
        dtype = accumulation_dtype(input.dtype)
        num_tokens = input.shape[0]
        outputs = {
            name: torch.empty(num_tokens, dtype=torch.bool if name == "is_top1" else dtype, device=input.device)
            for name in STATISTICS
            if name in call.statistics
        }
        lse = torch.empty(num_tokens, dtype=dtype, device=input.device)

        def chunk_outputs(logits: torch.Tensor, rows: slice, scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
            z, _ = call.transform.apply_(logits)
            row_outputs, lse[rows] = _chunk_outputs(z, call.target[rows], call)
            for name, values in outputs.items():
                values[rows] = getattr(row_outputs, name)
            return row_outputs.log_probs

        ones = torch.ones(num_tokens, dtype=dtype, device=input.device)
        log_probs = fused_pass(input, linear_weight, linear_bias, chunk_outputs, ones, call.chunk, (None,) * 3)
        entropy = outputs.get("entropy")
        ctx.call, ctx.has_entropy = call, entropy is not None
        ctx.save_for_backward(input, linear_weight, linear_bias, lse, entropy)
        results = [outputs.get(name) for name in STATISTICS]
        if entropy is not None:
            results[0] = entropy.clone()  # a copy: the caller may change its outputs in place
        ctx.mark_non_differentiable(*(value for value in results[1:] if value is not None))
        return log_probs, *results

    @staticmethod
    def backward(ctx: Any, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None, *_: Any) -> Any:
        refuse_second_order()
        if not ctx.has_entropy:
            grad_entropy = None
        needs = ctx.needs_input_grad[:3]
        if (grad_log_probs is None and grad_entropy is None) or not any(needs):
            return None, None, None, None  # alike on every rank: the same outputs are used everywhere
        input, linear_weight, linear_bias, lse, entropy = ctx.saved_tensors
        call: _Call = ctx.call
        dtype = lse.dtype
        grad_log_probs = None if grad_log_probs is None else grad_log_probs.to(dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(dtype)

        def rows_of(tensor: torch.Tensor | None, token: slice) -> torch.Tensor | None:
            return None if tensor is None else tensor[token]

        def chunk_gradient(logits: torch.Tensor, rows: slice, scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
            def block_(block: slice) -> None:
                token = slice(rows.start + block.start, rows.start + block.stop)
                valid, column, held = _columns(call.target[token], call, logits.shape[1])
                gradient_block_(
                    logits[block], call.transform, lse[token], rows_of(entropy, token),
                    rows_of(grad_log_probs, token), rows_of(grad_entropy, token), valid, column, held,
                )  # fmt: skip

            for_each_row_block(logits, block_)
            return scale  # placeholder per-token values: the backward pass keeps none

        grads = new_grads(input, linear_weight, linear_bias, needs, accumulation_dtype(linear_weight.dtype))
        ones = torch.ones(input.shape[0], dtype=dtype, device=input.device)
        fused_pass(input, linear_weight, linear_bias, chunk_gradient, ones, call.chunk, grads)
        grad_input, grad_weight, grad_bias = cast_grads(grads, input, linear_weight, linear_bias)
        if grad_input is not None:
            dist.all_reduce(grad_input, group=call.group)  # every rank's classes contribute to d(input)
        return grad_input, grad_weight, grad_bias, None
