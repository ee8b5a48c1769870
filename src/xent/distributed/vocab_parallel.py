"""Softmax losses over a vocabulary split across the ranks of a process group, without gathering the logits.

Rank r holds the columns ``[offset_r, offset_r + V_r)`` of the logits (slices in rank order, any sizes). Every loss
of the fused family is one row-loss description (:mod:`xent.core.rowloss`): a transform of the logits that is local
to each column (cap, per-class offset, the target's margin, scale), and a function of a few per-row numbers. So each
rank reduces its own slice and the ranks all-reduce those numbers::

    agree  = all_gather(checks, sizes, fingerprints)   O(world), once: every rank raises alike, or none does
    z      = s (cap(x) + o − m_y e_y)            the rank's columns, float32
    m      = all_reduce_max(max_c z)              O(rows)
    lse    = m + log all_reduce_sum(Σ_c e^(z − m))
    z_y    = all_reduce_sum(z[y] on the rank that holds y, 0 elsewhere);   u = z_y − lse = log p_y
    h      = all_reduce_sum(1 on the rank that holds y, 0 elsewhere)      h = 0: y ∉ [0, V), the row is NaN
    S      = all_reduce_sum(Σ_c w_c z_c)          label smoothing only
    loss   = w_y α_y ψ(u) + ε/V (W lse − S) + ζ w_y lse²                  W = Σ_c w_c (w ≡ 1 without class weights)
    ∂loss/∂z_c = p_c [−w_y α_y ψ'(u) + ε W / V + 2 ζ w_y lse] + w_y α_y ψ'(u) [c = y] − ε w_c / V

(the sums go in one all-reduce) and the gradient of a shard is formed from the shard and the saved ``lse`` and ``u``,
with no communication at all. Before any of it, the agreement step (:mod:`xent.distributed.agreement`) gathers what
each rank checked alone and what the ranks must pass alike — the loss and its options, the target (a checksum), the
dtype, the shapes — so a bad or differing argument on any rank raises on every rank, naming the rank and the
argument, instead of leaving the others in a collective or combining statistics of different losses.

:func:`vocab_parallel_linear_loss` does the same per chunk of tokens of a head whose weight is split over the
vocabulary: the ``N × V_r`` logits are never formed, and ``d(input)`` — a sum over every rank's classes — is
all-reduced once in backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from xent.core.reduce import reduce_loss
from xent.distributed.agreement import GIVEN, Terms, agree
from xent.distributed.shard import ShardCall, ShardLinearRows, ShardRows, VocabShard, target_rows_of, target_weight_of
from xent.kernels.linear import default_chunk_size
from xent.losses import checks
from xent.losses.family import check_fused_call, family_loss
from xent.losses.linear import check_head
from xent.losses.softmax import cross_entropy

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_loss",
    "vocab_parallel_loss",
]


def vocab_parallel_loss(
    loss: Any,
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Any = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    **loss_options: Any,
) -> torch.Tensor:
    r"""Any fused softmax loss of xent on logits whose vocabulary is split across the ranks of ``group``.

    Every rank returns the loss that ``loss`` gives on the full logits (the shards concatenated in rank order), and
    the gradient of ``logits_shard`` is the rank's slice of the full gradient. The logits are never gathered: the
    ranks all-reduce per-row statistics, O(rows) each (see ``xent.distributed.vocab_parallel``).

    Args:
        loss: one of the losses :func:`xent.linear_loss` fuses — :func:`xent.cross_entropy`, :func:`xent.focal_loss`,
            :func:`xent.logit_adjusted_cross_entropy`, … — or its name.
        logits_shard: ``(..., V_r)``, the columns ``[offset_r, offset_r + V_r)`` of the logits, where the offsets
            follow the ranks' shard sizes in rank order (sizes may differ; every rank holds at least one class). A
            ``DTensor`` sharded on its last dimension (``Shard(-1)`` on a 1-D mesh, as a column-parallel head with
            ``use_local_output=False`` produces) is accepted too; its mesh gives the group.
        target: ``(...)`` global class indices in ``[0, V)`` or ``ignore_index``, the same on every rank. With value
            checks off (:func:`xent.value_checks`, the default for GPU tensors) a target outside ``[0, V)`` is not
            caught up front: no shard holds it, and its row's loss (and its gradient, where the loss is used) is
            NaN — so a mean over the batch is NaN too — never a finite wrong value.
        group: the process group the vocabulary is split over (default: the world).
        weight: the rank's ``(V_r,)`` slice of the class weight, or ``None``.
        ignore_index, reduction: as in the loss.
        softcap: caps the logits, :math:`c \tanh(z / c)`, before the loss (any loss, as in :func:`xent.linear_loss`).
        **loss_options: the loss's own options. Per-class ones (``class_counts``, a per-class ``alpha``) cover the
            whole vocabulary and are the same on every rank, as ``target`` is.

    Returns:
        The loss, the same on every rank: ``()``, or the batch shape ``(...)`` for ``reduction="none"``; float32
        for half-precision logits, as the statistics are.

    Raises:
        ValueError, TypeError: a bad argument on any rank — an option, a shape or dtype, the rank's weight slice, a
            target outside ``[0, V)`` (value checks on) — or an argument that differs between ranks (the loss, its
            options, ``reduction``, ``ignore_index``, ``softcap``, whether ``weight`` is given, the target's shape
            and contents, the dtype). Raised on every rank alike, with one message naming the rank(s) and the
            argument (``"rank 1: target holds class index 70 at position 3 …"``, ``"label_smoothing differs between
            ranks: 0.0 on rank 0; 0.1 on rank 1 …"``), before any collective that a rank would wait in. They cost
            one all-gather of 11 numbers per rank (and, on the error path only, one ``all_gather_object``).

    Example (on each rank, e.g. under ``torchrun --nproc-per-node 2``)::

        shard = full_logits.tensor_split(world_size, dim=-1)[rank]          # (N, V_r)
        loss = vocab_parallel_loss(xent.focal_loss, shard, target, gamma=2.0)
    """
    group = group_of(logits_shard, group)
    terms = Terms()
    try:  # every local check, its error kept for the agreement step, so that every rank raises it
        logits_shard = checks.check_floating("logits_shard", local_shard(logits_shard, group))
        target = checks.check_tensor("target", target)
        if logits_shard.dim() == 0 or logits_shard.shape[:-1] != target.shape:
            raise ValueError(
                f"logits_shard must have shape (..., V_r) with target's shape (...) in front; got logits_shard "
                f"{checks.shape_str(logits_shard.shape)} and target {checks.shape_str(target.shape)}"
            )
        terms.agreed["logits_shard's dtype"] = logits_shard.dtype
        weight = _check_locally(terms, loss, target, logits_shard.shape[-1], logits_shard.device, weight,
                                ignore_index, reduction, softcap, loss_options)  # fmt: skip
    except Exception as error:  # whatever it is, every rank must hear of it, or the others hang
        terms.error = error
    device = collective_device(group, logits_shard, target)
    shard, _ = _agree(terms, group, device, loss, ignore_index, softcap, loss_options)
    flat_target = _flat_target(terms)
    target_weight, total_weight = target_weight_of(flat_target, weight, shard, logits_shard.dtype)
    call = ShardCall(shard, flat_target, weight, target_rows_of(flat_target, target_weight, total_weight, shard))
    per_row = ShardRows.apply(logits_shard.reshape(-1, shard.size), call)
    return _reduce(per_row, target.shape, reduction, target_weight)


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
    """:func:`xent.cross_entropy` of logits whose vocabulary is split across the ranks of ``group``: every rank gets
    the full loss and its slice of the gradient (:func:`vocab_parallel_loss` with cross-entropy).

    Example (on each rank)::

        loss = vocab_parallel_cross_entropy(logits_shard, target, label_smoothing=0.1, z_loss=1e-4)
    """
    return vocab_parallel_loss(
        cross_entropy, logits_shard, target, group=group, weight=weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )  # fmt: skip


def vocab_parallel_linear_loss(
    loss: Any,
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
    softcap: float | None = None,
    **loss_options: Any,
) -> torch.Tensor:
    r"""Any fused softmax loss of a linear head whose weight is split over the vocabulary across ``group``.

    ``input`` is replicated on every rank (as in Megatron-style tensor parallelism); rank r holds the rows
    ``[offset_r, offset_r + V_r)`` of the head's weight (and bias). Tokens go in chunks: a chunk's ``c × V_r``
    logits, their statistics all-reduced (O(c) per rank), its losses — so no rank ever holds ``N × V_r`` logits. The
    backward pass recomputes each chunk's logits, with no communication but one all-reduce of ``d(input)`` (every
    rank's classes contribute to it); ``d(linear_weight_shard)`` and ``d(linear_bias_shard)`` are the rank's slices
    of the full gradients.

    Args:
        loss: as in :func:`vocab_parallel_loss`.
        input: hidden states ``(..., D)``, the same on every rank.
        linear_weight_shard: ``(V_r, D)``, the rank's rows of the head's weight, same dtype as ``input`` (or a
            ``DTensor`` sharded on dimension 0, as ``ColwiseParallel`` shards an ``nn.Linear``).
        target: ``(...)`` global class indices, the same on every rank.
        linear_bias_shard: ``(V_r,)`` or ``None``.
        group: the process group (default: the world).
        chunk_size: tokens per chunk (default as :func:`xent.linear_cross_entropy` on the rank's shard); the ranks
            all use the smallest rank's, so that they run the same number of chunks.
        weight, ignore_index, reduction, softcap, loss_options: as in :func:`vocab_parallel_loss`.

    Returns:
        The loss, the same on every rank, as :func:`vocab_parallel_loss` returns it.

    Raises:
        ValueError, TypeError: as :func:`vocab_parallel_loss`, on every rank alike; ``input``'s shape and dtype are
            agreed on too (it is replicated).
    """
    group = group_of(linear_weight_shard, group)
    terms = Terms()
    try:  # every local check, its error kept for the agreement step, so that every rank raises it
        linear_weight_shard, linear_bias_shard, target, size = check_head_shard(
            input, linear_weight_shard, linear_bias_shard, target, group
        )
        # the input is replicated: its shape and dtype size the collectives (per chunk, and d(input) in backward)
        terms.agreed.update({"input's shape": tuple(input.shape), "input's dtype": input.dtype})
        checks.check_chunk_size(chunk_size)
        weight = _check_locally(terms, loss, target, size, input.device, weight, ignore_index, reduction, softcap,
                                loss_options)  # fmt: skip
        terms.chunk_size = chunk_size or default_chunk_size(target.numel(), size, input.device)
    except Exception as error:  # whatever it is, every rank must hear of it, or the others hang
        terms.error = error
    device = collective_device(group, input, target)
    shard, chunk_size = _agree(terms, group, device, loss, ignore_index, softcap, loss_options)
    flat_target = _flat_target(terms)
    target_weight, total_weight = target_weight_of(flat_target, weight, shard, input.dtype)
    flat_input = input.reshape(-1, input.shape[-1]).contiguous()
    target_rows = target_rows_of(flat_target, target_weight, total_weight, shard)
    call = ShardCall(shard, flat_target, weight, target_rows, chunk_size)
    per_row = ShardLinearRows.apply(flat_input, linear_weight_shard, linear_bias_shard, call)
    return _reduce(per_row, target.shape, reduction, target_weight)


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
    """:func:`xent.linear_cross_entropy` of a head whose weight is split over the vocabulary across ``group``
    (:func:`vocab_parallel_linear_loss` with cross-entropy).

    Example (on each rank; ``hidden`` the same everywhere, ``head_shard`` the rank's rows of the head's weight)::

        loss = vocab_parallel_linear_cross_entropy(hidden, head_shard, target, z_loss=1e-4)
    """
    return vocab_parallel_linear_loss(
        cross_entropy, input, linear_weight_shard, target, linear_bias_shard=linear_bias_shard, group=group,
        chunk_size=chunk_size, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )  # fmt: skip


# --- checks and set-up -------------------------------------------------------------------------------------------


def check_head_shard(
    input: torch.Tensor, linear_weight_shard: Any, linear_bias_shard: Any, target: Any, group: Any
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """A rank's local checks of a weight-sharded head (run inside the agreement's try: they raise on one rank):
    ``(weight shard, bias shard, target, V_r)``, a DTensor shard taken as its local rows."""
    linear_weight_shard = local_shard(linear_weight_shard, group, dim=0)
    if linear_bias_shard is not None:
        linear_bias_shard = local_shard(linear_bias_shard, group, dim=0)
    size = check_head(
        input, linear_weight_shard, linear_bias_shard, ("input", "linear_weight_shard", "linear_bias_shard")
    )
    target = checks.check_tensor("target", target)
    if input.shape[:-1] != target.shape:
        raise ValueError(
            f"input must have shape (..., D) with target's shape (...) in front; got input "
            f"{checks.shape_str(input.shape)} and target {checks.shape_str(target.shape)}"
        )
    return linear_weight_shard, linear_bias_shard, target, size


def group_of(tensor: Any, group: Any) -> Any:
    """The group the ranks agree in: ``group``, else a DTensor's mesh's, else the world (None)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab-parallel losses need torch.distributed initialised (init_process_group)")
    if group is not None:
        return group
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed tensors
        return None
    if isinstance(tensor, DTensor) and tensor.device_mesh.ndim == 1:
        return tensor.device_mesh.get_group()
    return None


def local_shard(tensor: torch.Tensor, group: Any, dim: int = -1) -> torch.Tensor:
    """A DTensor sharded on ``dim`` of a 1-D mesh (whose group is ``group``) → its local shard; anything else as
    is."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch builds without distributed tensors
        return tensor
    if not isinstance(tensor, DTensor):
        return tensor
    placements, mesh = tensor.placements, tensor.device_mesh
    wanted = dim % tensor.dim()
    if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and
                                                       placements[0].dim % tensor.dim() == wanted):  # fmt: skip
        raise ValueError(f"a DTensor must be sharded on dimension {dim} of a 1-D mesh, got placements {placements}")
    if group is not mesh.get_group():
        raise ValueError("group differs from the DTensor's mesh: pass one or the other")
    return tensor.to_local()


def collective_device(group: Any, *tensors: Any) -> torch.device:
    """Where the agreement's vector lives: the first tensor argument's device (NCCL needs the rank's GPU)."""
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    if dist.get_backend(group) == "nccl":  # pragma: no cover - GPUs
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_locally(
    terms: Terms,
    loss: Any,
    target: torch.Tensor,
    size: int,
    device: torch.device,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    loss_options: dict[str, Any],
) -> torch.Tensor | None:
    """The checks of the loss, its options, the target and the rank's weight slice that need no other rank, and
    what the ranks must agree on, into ``terms``; returns the checked weight. Raises the first failure."""
    entry = family_loss(loss)
    checks.check_reduction_and_ignore_index(reduction, ignore_index)
    softcap = check_fused_call(entry, loss_options, softcap=softcap)
    entry.check_values(loss_options)  # the vocabulary's size is not known yet: that part comes after
    weight = _checked_weight(weight, size, device)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    # what every rank must pass alike: the row-loss options, the target (shape and contents), whether it is weighted
    terms.agreed.update({"loss": entry.name, "reduction": reduction, "ignore_index": ignore_index, "softcap": softcap})
    terms.agreed.update({key: agreed_value(value) for key, value in sorted(loss_options.items())})
    terms.agreed.update({"weight": None if weight is None else GIVEN, "target": target.long()})
    terms.size, terms.target, terms.ignore_index = size, target.reshape(-1).long(), ignore_index
    return weight


def agreed_value(value: Any) -> Any:
    """An option as the ranks compare it: numbers as floats (``0`` and ``0.0`` agree), tensors and the rest as is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _agree(
    terms: Terms,
    group: Any,
    device: torch.device,
    loss: Any,
    ignore_index: int,
    softcap: float | None,
    loss_options: dict[str, Any],
) -> tuple[VocabShard, int]:
    """The one agreement step (:mod:`xent.distributed.agreement`) — every rank raises alike there, or none does —
    then the loss's description over the whole vocabulary and the rank's offset; and the chunk size every rank
    uses."""
    agreement = agree(terms, group, device)
    vocab = sum(agreement.sizes)
    if softcap is not None:
        softcap = float(softcap)
    # the options agree on every rank, so the description's checks (per-class lengths against V) fail alike
    options = family_loss(loss).description(vocab, loss_options, softcap=softcap, ignore_index=ignore_index)
    rank = dist.get_rank(group)
    return VocabShard(group, sum(agreement.sizes[:rank]), agreement.sizes[rank], vocab, options), agreement.chunk_size


def _flat_target(terms: Terms) -> torch.Tensor:
    if terms.target is None:  # pragma: no cover - the agreement raised
        raise RuntimeError("the agreement step passed without a checked target")
    return terms.target


def _checked_weight(weight: torch.Tensor | None, size: int, device: torch.device) -> torch.Tensor | None:
    if weight is None:
        return None
    weight = checks.check_class_weight("weight", weight, size)
    if weight.requires_grad:
        raise ValueError("weight requires grad, but the vocab-parallel losses do not differentiate the class weight")
    return weight.to(device)


def _reduce(rows: torch.Tensor, batch_shape: torch.Size, reduction: str, target_weight: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return rows.view(batch_shape)
    return reduce_loss(rows, reduction, target_weight.sum())
