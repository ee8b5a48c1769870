"""Cross-entropy over a vocabulary split across the ranks of a process group, without gathering the logits.

Rank r holds the columns ``[offset_r, offset_r + V_r)`` of the logits (slices in rank order, any sizes). A row's loss
needs only a few numbers from every shard, so each rank reduces its own slice and the ranks all-reduce those::

    x      = cap(logits_shard)                   local, float32
    m      = all_reduce_max(max_c x)              O(rows)
    lse    = m + log all_reduce_sum(Σ_c e^(x - m))
    x_y    = all_reduce_sum(x[y] on the rank that holds y, 0 elsewhere)
    S      = all_reduce_sum(Σ_c w_c x_c)          label smoothing only
    loss   = (1 - ε) w_y (lse - x_y) + ε/V (W lse - S) + z w_y lse²      W = Σ_c w_c, w ≡ 1 without class weights
    ∂loss/∂x_c = p_c [(1 - ε) w_y + ε W / V + 2 z w_y lse] - (1 - ε) w_y [c = y] - ε w_c / V
                                                  local, with p_c = e^(x_c - lse) (and the cap's 1 - tanh²)

so communication is O(rows) per rank (plus the shard sizes, once), and the gradient of a shard is formed from the
shard and the saved ``lse`` with no communication at all. :func:`vocab_parallel_linear_cross_entropy` does the same
per chunk of tokens of a head whose weight is split over the vocabulary: the ``N × V_r`` logits are never formed, and
``d(input)`` — a sum over every rank's classes — is all-reduced once in backward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from xent.core.reduce import accumulation_dtype, reduce_loss
from xent.kernels.linear import default_chunk_size
from xent.losses import _checks
from xent.losses.softmax import check_softmax_options

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]


@dataclasses.dataclass(frozen=True)
class _Shard:
    """The rank's slice of the vocabulary and the options every row reads."""

    group: Any
    offset: int
    size: int
    vocab: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    ignore_index: int


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Any = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    r""":func:`xent.cross_entropy` of logits whose vocabulary is split across the ranks of ``group``.

    Every rank returns the loss that ``xent.cross_entropy`` gives on the full logits (concatenated in rank order),
    and the gradient of ``logits_shard`` is the rank's slice of the full gradient. The logits are never gathered:
    the ranks all-reduce per-row statistics (max, sum of exponentials, target logit, smoothing sum), O(rows) each
    (see :mod:`xent.distributed.vocab_parallel`).

    Args:
        logits_shard: ``(..., V_r)``, the columns ``[offset_r, offset_r + V_r)`` of the logits, where the offsets
            follow the ranks' shard sizes in rank order (sizes may differ). A ``DTensor`` sharded on its last
            dimension (``Shard(-1)`` on a 1-D mesh, as a column-parallel head with ``use_local_output=False``
            produces) is accepted too; its mesh gives the group.
        target: ``(...)`` global class indices in ``[0, V)`` or ``ignore_index``, the same on every rank.
        group: the process group the vocabulary is split over (default: the world).
        weight: the rank's ``(V_r,)`` slice of the class weight, or ``None``.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in :func:`xent.cross_entropy`.

    Returns:
        The loss, the same on every rank: ``()``, or the batch shape ``(...)`` for ``reduction="none"``; float32
        for half-precision logits, as the statistics are.

    Raises:
        ValueError: a bad option or shape, or a target outside ``[0, V)`` — raised on every rank, before any rank
            waits on a collective that another will not join.

    Example (on each of the ranks, e.g. under ``torchrun --nproc-per-node 2``)::

        shard = full_logits.tensor_split(world_size, dim=-1)[rank]          # (N, V_r)
        loss = vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1)
    """
    logits_shard, group = _local(logits_shard, group)
    logits_shard = _checks.check_floating("logits_shard", logits_shard)
    target = _checks.check_tensor("target", target)
    if logits_shard.dim() == 0 or logits_shard.shape[:-1] != target.shape:
        raise ValueError(
            f"logits_shard must have shape (..., V_r) with target's shape (...) in front; got logits_shard "
            f"{_checks.shape_str(logits_shard.shape)} and target {_checks.shape_str(target.shape)}"
        )
    shard = _shard(logits_shard.shape[-1], logits_shard.device, group, ignore_index, label_smoothing, z_loss, softcap,
                   reduction)  # fmt: skip
    flat_target = _checked_target(target.reshape(-1), shard)
    weight = _checked_weight(weight, shard, logits_shard.device)
    target_weight, total_weight = _target_weight(flat_target, weight, shard, logits_shard.dtype)
    rows = _VocabParallelRows.apply(
        logits_shard.reshape(-1, shard.size), flat_target, weight, target_weight, total_weight, shard
    )
    return _reduce(rows, target.shape, reduction, flat_target, target_weight, shard)


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias_shard: torch.Tensor | None = None,
    group: Any = None,
    chunk_size: int | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    r""":func:`xent.linear_cross_entropy` of a head whose weight is split over the vocabulary across ``group``.

    ``input`` is replicated on every rank (as in Megatron-style tensor parallelism); rank r holds the rows
    ``[offset_r, offset_r + V_r)`` of the head's weight (and bias). Tokens go in chunks: a chunk's ``c × V_r``
    logits, their statistics all-reduced (O(c) per rank), its loss — so no rank ever holds ``N × V_r`` logits. The
    backward pass recomputes each chunk's logits from the saved log-sum-exps, with no communication but one
    all-reduce of ``d(input)`` (every rank's classes contribute to it); ``d(linear_weight_shard)`` and
    ``d(linear_bias_shard)`` are the rank's slices of the full gradients.

    Args:
        input: hidden states ``(..., D)``, the same on every rank.
        linear_weight_shard: ``(V_r, D)``, the rank's rows of the head's weight, same dtype as ``input``.
        target: ``(...)`` global class indices, the same on every rank.
        linear_bias_shard: ``(V_r,)`` or ``None``.
        group: the process group (default: the world).
        chunk_size: tokens per chunk (default as :func:`xent.linear_cross_entropy` on the rank's shard).
        weight, ignore_index, reduction, label_smoothing, z_loss, softcap: as in :func:`vocab_parallel_cross_entropy`.

    Returns:
        The loss, the same on every rank, as :func:`vocab_parallel_cross_entropy` returns it.
    """
    input = _checks.check_floating("input", input)
    linear_weight_shard, group = _local(linear_weight_shard, group, dim=0)
    linear_weight_shard = _checks.check_floating("linear_weight_shard", linear_weight_shard)
    target = _checks.check_tensor("target", target)
    if input.dim() == 0 or input.shape[:-1] != target.shape:
        raise ValueError(
            f"input must have shape (..., D) with target's shape (...) in front; got input "
            f"{_checks.shape_str(input.shape)} and target {_checks.shape_str(target.shape)}"
        )
    if linear_weight_shard.dim() != 2 or linear_weight_shard.shape[1] != input.shape[-1]:
        raise ValueError(
            f"linear_weight_shard must have shape (V_r, {input.shape[-1]}), got "
            f"{_checks.shape_str(linear_weight_shard.shape)}"
        )
    if linear_weight_shard.dtype != input.dtype:
        raise TypeError(f"linear_weight_shard has dtype {linear_weight_shard.dtype} but input has {input.dtype}")
    size = linear_weight_shard.shape[0]
    if linear_bias_shard is not None:
        linear_bias_shard, _ = _local(linear_bias_shard, group, dim=0)
        linear_bias_shard = _checks.check_floating("linear_bias_shard", linear_bias_shard)
        if linear_bias_shard.shape != (size,) or linear_bias_shard.dtype != input.dtype:
            raise ValueError(
                f"linear_bias_shard must have shape ({size},) and dtype {input.dtype}, got "
                f"{_checks.shape_str(linear_bias_shard.shape)} {linear_bias_shard.dtype}"
            )
    _checks.check_chunk_size(chunk_size)
    shard = _shard(size, input.device, group, ignore_index, label_smoothing, z_loss, softcap, reduction)
    flat_target = _checked_target(target.reshape(-1), shard)
    weight = _checked_weight(weight, shard, input.device)
    target_weight, total_weight = _target_weight(flat_target, weight, shard, input.dtype)
    flat_input = input.reshape(-1, input.shape[-1]).contiguous()
    chunk_size = chunk_size or default_chunk_size(flat_input.shape[0], max(size, 1), input.device)
    rows = _VocabParallelLinearRows.apply(
        flat_input, linear_weight_shard, linear_bias_shard, flat_target, weight, target_weight, total_weight, shard,
        chunk_size,
    )  # fmt: skip
    return _reduce(rows, target.shape, reduction, flat_target, target_weight, shard)


# --- checks and set-up -------------------------------------------------------------------------------------------


def _local(tensor: torch.Tensor, group: Any, dim: int = -1) -> tuple[torch.Tensor, Any]:
    """A DTensor sharded on ``dim`` of a 1-D mesh → its local shard and the mesh's group; anything else as is."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch builds without distributed tensors
        return tensor, group
    if not isinstance(tensor, DTensor):
        return tensor, group
    placements, mesh = tensor.placements, tensor.device_mesh
    wanted = dim % tensor.dim()
    if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and
                                                       placements[0].dim % tensor.dim() == wanted):  # fmt: skip
        raise ValueError(f"a DTensor must be sharded on dimension {dim} of a 1-D mesh, got placements {placements}")
    if group is not None and group is not mesh.get_group():
        raise ValueError("group differs from the DTensor's mesh: pass one or the other")
    return tensor.to_local(), mesh.get_group()


def _shard(size, device, group, ignore_index, label_smoothing, z_loss, softcap, reduction) -> _Shard:
    """The rank's offset and the whole vocabulary: one all-gather of the shard sizes (O(world))."""
    label_smoothing, z_loss, softcap = check_softmax_options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, ignore_index=ignore_index
    )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab-parallel losses need torch.distributed initialised (init_process_group)")
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([size], dtype=torch.long, device=device), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    vocab = sum(sizes)
    if min(sizes) == 0:  # every rank sees every size, so every rank raises
        raise ValueError(f"every rank must hold at least one class of the vocabulary; shard sizes by rank: {sizes}")
    return _Shard(group, sum(sizes[:rank]), size, vocab, label_smoothing, z_loss, softcap, ignore_index)


def _checked_target(target: torch.Tensor, shard: _Shard) -> torch.Tensor:
    """Global class ids, checked on every rank alike (the target is the same everywhere, so all ranks raise)."""
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    target = target.long()
    _checks.check_class_indices(target, shard.vocab, shard.ignore_index)
    return target


def _checked_weight(weight: torch.Tensor | None, shard: _Shard, device: torch.device) -> torch.Tensor | None:
    if weight is None:
        return None
    weight = _checks.check_class_weight("weight", weight, shard.size)
    if weight.requires_grad:
        raise ValueError("weight requires grad, but the vocab-parallel losses do not differentiate the class weight")
    return weight.to(device)


def _target_weight(
    target: torch.Tensor, weight: torch.Tensor | None, shard: _Shard, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_y (M,), W = Σ_c w_c)`` of the whole vocabulary in ``dtype``, 0 for ignored rows; all-reduced when
    weighted."""
    dtype = accumulation_dtype(dtype)
    valid = target != shard.ignore_index
    if weight is None:
        return valid.to(dtype), torch.tensor(float(shard.vocab), dtype=dtype, device=target.device)
    local, inside = _local_target(target, shard)
    picked = torch.where(inside, weight.to(dtype)[local], torch.zeros((), dtype=dtype, device=weight.device))
    totals = torch.cat([picked, weight.to(dtype).sum().view(1)])
    dist.all_reduce(totals, group=shard.group)
    return totals[:-1], totals[-1]


def _local_target(target: torch.Tensor, shard: _Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """``(column in the shard, clamped to a valid one; whether the rank holds it)`` of each row's target."""
    local = target - shard.offset
    inside = (target != shard.ignore_index) & (local >= 0) & (local < shard.size)
    return torch.where(inside, local, torch.zeros_like(local)), inside


def _reduce(rows, batch_shape, reduction, target, target_weight, shard) -> torch.Tensor:
    if reduction == "none":
        return rows.view(batch_shape)
    return reduce_loss(rows, reduction, target_weight.sum())


# --- the row computation, shared by both losses ------------------------------------------------------------------


def _capped(logits: torch.Tensor, shard: _Shard) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cap(x), tanh(x / c))`` in the accumulation dtype (the tanh kept for the chain rule)."""
    x = logits.to(accumulation_dtype(logits.dtype))
    if shard.softcap is None:
        return x, None
    tanh = torch.tanh(x / shard.softcap)
    return tanh * shard.softcap, tanh


def _row_losses(x, target, weight, target_weight, total_weight, shard) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses, lse)`` of rows whose shard of capped logits is ``x (B, V_r)``: two all-reduces."""
    row_max = x.amax(dim=1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shard.group)
    local, inside = _local_target(target, shard)
    if not shard.label_smoothing:
        smooth = torch.zeros_like(row_max)
    else:
        smooth = x.sum(dim=1) if weight is None else x @ weight.to(x.dtype)
    sums = torch.stack(
        [
            torch.exp(x - row_max.unsqueeze(1)).sum(dim=1),
            torch.where(inside, x.gather(1, local.unsqueeze(1)).squeeze(1), 0.0),
            smooth,
        ]
    )
    dist.all_reduce(sums, group=shard.group)
    sum_exp, target_logit, smooth = sums
    lse = row_max + torch.log(sum_exp)
    eps, valid = shard.label_smoothing, target != shard.ignore_index
    loss = (1.0 - eps) * target_weight * (lse - target_logit)
    if eps:
        loss = loss + eps / shard.vocab * (total_weight * lse - smooth)
    if shard.z_loss:
        loss = loss + shard.z_loss * target_weight * lse.square()
    return torch.where(valid, loss, torch.zeros_like(loss)), lse


def _row_gradient_(x, tanh, target, weight, target_weight, total_weight, lse, grad_rows, shard) -> torch.Tensor:
    """``∂(Σ g_n loss_n)/∂logits`` of the shard, formed over ``x`` (overwritten)."""
    eps = shard.label_smoothing
    valid = target != shard.ignore_index
    scale = torch.where(valid, grad_rows.to(x.dtype), torch.zeros_like(lse))
    coefficient = (1.0 - eps) * target_weight + eps * total_weight / shard.vocab
    if shard.z_loss:
        coefficient = coefficient + 2.0 * shard.z_loss * target_weight * lse
    grad = x.sub_(lse.unsqueeze(1)).exp_().mul_((coefficient * scale).unsqueeze(1))  # p_c · coefficient · g
    local, inside = _local_target(target, shard)
    grad.scatter_add_(1, local.unsqueeze(1), (-(1.0 - eps) * target_weight * scale * inside).unsqueeze(1))
    if eps:
        per_class = torch.ones(shard.size, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
        grad.sub_((eps / shard.vocab) * scale.unsqueeze(1) * per_class)
    if tanh is not None:
        grad.mul_(1.0 - tanh.square())
    return grad


class _VocabParallelRows(torch.autograd.Function):
    """Per-row losses of a logits shard; backward forms the shard's gradient locally from the saved ``lse``."""

    @staticmethod
    def forward(ctx, logits, target, weight, target_weight, total_weight, shard):
        x, _ = _capped(logits, shard)
        losses, lse = _row_losses(x, target, weight, target_weight, total_weight, shard)
        ctx.shard = shard
        ctx.save_for_backward(logits, target, weight, target_weight, total_weight, lse)
        return losses

    @staticmethod
    def backward(ctx, grad_rows):
        logits, target, weight, target_weight, total_weight, lse = ctx.saved_tensors
        x, tanh = _capped(logits, ctx.shard)
        x = x.clone() if x is logits else x  # formed in place: never over the saved logits
        grad = _row_gradient_(x, tanh, target, weight, target_weight, total_weight, lse, grad_rows, ctx.shard)
        return grad.to(logits.dtype), None, None, None, None, None


class _VocabParallelLinearRows(torch.autograd.Function):
    """Per-row losses of a weight-sharded head, chunk by chunk; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, target_weight, total_weight, shard, chunk):
        losses, lses = [], []
        for start in range(0, input.shape[0], chunk):
            rows = slice(start, start + chunk)
            x, _ = _capped(_chunk_logits(input[rows], linear_weight, linear_bias), shard)
            loss, lse = _row_losses(x, target[rows], weight, target_weight[rows], total_weight, shard)
            losses.append(loss)
            lses.append(lse)
        ctx.shard, ctx.chunk = shard, chunk
        lse = torch.cat(lses) if lses else torch.zeros(0, device=input.device)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, target_weight, total_weight, lse)
        return torch.cat(losses) if losses else torch.zeros(0, device=input.device)

    @staticmethod
    def backward(ctx, grad_rows):
        input, linear_weight, linear_bias, target, weight, target_weight, total_weight, lse = ctx.saved_tensors
        shard, needs = ctx.shard, ctx.needs_input_grad
        dtype = accumulation_dtype(linear_weight.dtype)
        grad_input = torch.zeros_like(input) if needs[0] else None
        grad_weight = torch.zeros(linear_weight.shape, dtype=dtype, device=input.device) if needs[1] else None
        grad_bias = torch.zeros(linear_weight.shape[0], dtype=dtype, device=input.device) if needs[2] else None
        for start in range(0, input.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            x, tanh = _capped(_chunk_logits(input[rows], linear_weight, linear_bias), shard)
            grad = _row_gradient_(x, tanh, target[rows], weight, target_weight[rows], total_weight, lse[rows],
                                  grad_rows[rows], shard)  # fmt: skip
            if grad_input is not None:
                grad_input[rows] = grad.to(linear_weight.dtype) @ linear_weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), input[rows].to(dtype))
            if grad_bias is not None:
                grad_bias.add_(grad.sum(dim=0))
        if grad_input is not None:
            dist.all_reduce(grad_input, group=shard.group)  # every rank's classes contribute to d(input)
        return (
            grad_input,
            None if grad_weight is None else grad_weight.to(linear_weight.dtype),
            None if grad_bias is None else grad_bias.to(linear_bias.dtype),
            *(None,) * 6,
        )


def _chunk_logits(input, linear_weight, linear_bias) -> torch.Tensor:
    logits = input @ linear_weight.t()
    return logits if linear_bias is None else logits.add_(linear_bias)
