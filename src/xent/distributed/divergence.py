r"""Distillation divergences over a vocabulary split across the ranks of a process group, without gathering the
logits: forward and reverse KL and the generalized Jensen–Shannon divergence (:mod:`xent.core.divergence`), from a
teacher given whole (its logits shard, or its head's shard) or by its top-k, with the hard-label term.

Rank r holds the columns ``[offset_r, offset_r + V_r)`` of the student's logits and of the dense teacher's, as
:mod:`xent.distributed.vocab_parallel` lays them out. A divergence is a sum over the vocabulary of per-class terms of
the two log-softmaxes, and its gradient is :math:`T (s_j - p_j \sum_c s_c)` with per-class slopes :math:`s`: so
each rank reduces its own columns and the ranks all-reduce a few numbers per row — the maxima, the sums of
exponentials, then the sums of the terms and of the slopes — and the gradient of a shard is formed from the shard
and those saved numbers alone. A top-k teacher's support ids are the same on every rank: each rank gathers the
student's logits at the ids it holds and sums its tail (the classes outside the support), one all-reduce makes the
``(rows, k)`` values and the tail's statistics whole, and :func:`xent.core.divergence.top_k_rows` runs on every rank.
The hard term's statistics travel in the same all-reduces. The numbers, per block of rows, are drawn in
:mod:`xent.distributed.divergence_shard`; the arguments go through the agreement step of
:mod:`xent.distributed.agreement` first, so a bad or differing argument on any rank raises on every rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch

from xent._config import value_checks_enabled
from xent.core.reduce import accumulation_dtype, reduce_loss, safe_divide
from xent.distributed.agreement import GIVEN, Terms, agree
from xent.distributed.divergence_shard import (
    DistillCall,
    DistillShard,
    DistillShardLinearRows,
    DistillShardRows,
    TopK,
)
from xent.distributed.vocab_parallel import agreed_value, collective_device, group_of, local_shard
from xent.kernels.distill import DistillSpec
from xent.kernels.linear import default_chunk_size
from xent.losses import checks, teachers
from xent.losses.distill import LinearDistillation
from xent.losses.linear import check_head

__all__ = ["vocab_parallel_distillation_loss", "vocab_parallel_linear_distillation_loss"]


def vocab_parallel_distillation_loss(
    student_logits_shard: torch.Tensor,
    teacher_logits_shard: torch.Tensor | None = None,
    *,
    teacher_indices: torch.Tensor | None = None,
    teacher_log_probs: torch.Tensor | None = None,
    top_k_tail: str = "renormalize",
    divergence: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    group: Any = None,
) -> torch.Tensor:
    r""":func:`xent.distillation_loss` of logits whose vocabulary is split across the ranks of ``group``.

    .. math::
        \ell_n = T^2 D(q_n, p_n) + \lambda \operatorname{CE}(z_{s,n}, y_n), \qquad
        p_n = \operatorname{softmax}(z_{s,n} / T), \quad q_n = \operatorname{softmax}(z_{t,n} / T)

    over the whole vocabulary (the shards concatenated in rank order), with ``D`` the divergence (``"forward_kl"``,
    ``"reverse_kl"``, ``"jsd"``, as in :func:`xent.distillation_loss`). Every rank returns that loss, and the
    gradient of ``student_logits_shard`` is the rank's slice of the full gradient. The logits are never gathered:
    the ranks all-reduce a few numbers per row (``k + 4`` with a top-k teacher, 6 with a dense one; 3 more with
    ``target`` and a non-zero ``hard_weight``).

    The positions are the rows of the flattened logits ``(M, V)``, as for :func:`vocab_parallel_loss`: the result
    equals ``xent.distillation_loss`` of the full logits flattened to ``(M, V)`` (top-k tensors to ``(M, k)``), so
    ``"batchmean"`` and ``"mean"`` are both the mean over the kept positions.

    Args:
        student_logits_shard: ``(..., V_r)``, the rank's columns of the student's logits (a ``DTensor`` sharded on
            its last dimension is accepted, as in :func:`vocab_parallel_loss`).
        teacher_logits_shard: ``(..., V_r)``, the rank's columns of the teacher's logits; or ``None`` with a top-k
            teacher. Never differentiated: refused when it requires grad (grad mode on).
        teacher_indices: ``(..., k)`` int64 global class ids of a top-k teacher, the same on every rank.
        teacher_log_probs: ``(..., k)`` their log-probabilities, the same on every rank; ``-inf`` entries are
            padding.
        top_k_tail: ``"renormalize"`` or ``"bucket"``, as in :func:`xent.distillation_loss`.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``; beta: :math:`\beta \in (0, 1)` of ``"jsd"``
            (default 0.5), refused for the KLs.
        temperature: :math:`T > 0`.
        reduction: ``"batchmean"``, ``"mean"`` (both the mean over kept positions; 0 when none is kept), ``"sum"``
            or ``"none"`` (the batch shape ``(...)``).
        target: ``(...)`` class indices for the hard-label term (at :math:`T = 1`), the same on every rank;
            positions whose target is ``ignore_index`` count for nothing (nor are their teacher entries read).
        ignore_index: as in :func:`xent.cross_entropy`.
        hard_weight: :math:`\lambda \ge 0`, read when ``target`` is given (0: the target masks only).
        num_items_in_batch: with ``"mean"``/``"batchmean"``, divide the sum by this instead (gradient
            accumulation, as transformers does).
        group: the process group (default: the world, or a DTensor's mesh's).

    Returns:
        The loss, the same on every rank: ``()`` or ``(...)`` for ``"none"``; float32 for half-precision logits.

    Raises:
        ValueError, TypeError: a bad argument on any rank (as :func:`xent.distillation_loss` raises it), or an
            argument that differs between ranks — raised on every rank alike, as :func:`vocab_parallel_loss` does.

    Example (on each rank)::

        loss = vocab_parallel_distillation_loss(student_shard, teacher_shard, divergence="jsd", temperature=2.0)
    """
    group = group_of(student_logits_shard, group)
    terms, options, student = Terms(), None, student_logits_shard
    try:  # every local check, its error kept for the agreement step, so that every rank raises it
        student = checks.check_floating("student_logits_shard", local_shard(student_logits_shard, group))
        teachers.check_teacher_given("teacher_logits_shard", teacher_logits_shard, teacher_indices, teacher_log_probs)
        if student.dim() == 0:
            raise ValueError("student_logits_shard must have shape (..., V_r), got shape ()")
        if teacher_logits_shard is not None:
            teacher_logits_shard = local_shard(teacher_logits_shard, group)
            teachers.refuse_grad("vocab_parallel_distillation_loss", teacher_logits_shard=teacher_logits_shard)
            teacher_logits_shard = checks.check_floating("teacher_logits_shard", teacher_logits_shard)
            if teacher_logits_shard.shape != student.shape:
                raise ValueError(
                    f"teacher_logits_shard has shape {checks.shape_str(teacher_logits_shard.shape)} but "
                    f"student_logits_shard has shape {checks.shape_str(student.shape)}; they must be equal"
                )
            terms.agreed["teacher_logits_shard's dtype"] = teacher_logits_shard.dtype
        terms.agreed["student_logits_shard's dtype"] = student.dtype
        options = _check_locally(terms, "vocab_parallel_distillation_loss", student.shape[:-1], student.shape[-1],
                                 teacher_indices, teacher_log_probs, top_k_tail, divergence, beta, temperature,
                                 reduction, target, ignore_index, hard_weight, num_items_in_batch)  # fmt: skip
    except Exception as error:  # whatever it is, every rank must hear of it, or the others hang
        terms.error = error
    agreement = agree(terms, group, collective_device(group, student_logits_shard, target))  # raises alike, or not
    options = _checked(options)
    shard, call = _set_up(terms, group, options, student, agreement.sizes)
    flat_teacher = None if teacher_logits_shard is None else teacher_logits_shard.reshape(-1, shard.size)
    per_row = DistillShardRows.apply(student.reshape(-1, shard.size), flat_teacher, call)
    return _reduce(per_row, student.shape[:-1], options, call.kept)


def vocab_parallel_linear_distillation_loss(
    input: torch.Tensor,
    linear_weight_shard: torch.Tensor,
    teacher_input: torch.Tensor | None = None,
    teacher_linear_weight_shard: torch.Tensor | None = None,
    *,
    linear_bias_shard: torch.Tensor | None = None,
    teacher_linear_bias_shard: torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
    teacher_log_probs: torch.Tensor | None = None,
    top_k_tail: str = "renormalize",
    divergence: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    target: torch.Tensor | None = None,
    hard_weight: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    group: Any = None,
) -> torch.Tensor:
    r""":func:`xent.linear_distillation_loss` of student and teacher heads whose weights are split over the
    vocabulary across ``group``: neither model's logits are formed whole, nor gathered.

    ``input`` and ``teacher_input`` are replicated on every rank; rank r holds the rows ``[offset_r, offset_r +
    V_r)`` of both heads (same split). Tokens go in chunks, as in :func:`vocab_parallel_linear_loss`: a chunk's
    ``c × V_r`` logits of each model, a few all-reduces of O(c) numbers (O(c k) with a top-k teacher), its losses.
    The backward pass recomputes each chunk's logits (the teacher's too), with no communication but one
    all-reduce of ``d(input)``; ``d(linear_weight_shard)``, ``d(linear_bias_shard)`` are the rank's slices. Each
    model's logits are ``z = logit_scale · softcap · tanh((x Wᵀ + b) / softcap)``; the loss is
    :func:`vocab_parallel_distillation_loss`'s of them (the hard term on the student's ``z``, at T = 1).

    Args:
        input: the student's hidden states ``(..., D)``, the same on every rank.
        linear_weight_shard: ``(V_r, D)``, the rank's rows of the student's head (or a ``DTensor`` sharded on
            dimension 0).
        teacher_input: the teacher's hidden states ``(..., D_t)``, the same on every rank; or ``None`` with a top-k
            teacher.
        teacher_linear_weight_shard: ``(V_r, D_t)``, the rank's rows of the teacher's head.
        linear_bias_shard, teacher_linear_bias_shard: ``(V_r,)`` or ``None``.
        teacher_indices, teacher_log_probs: a top-k teacher, ``(..., k)`` each, the same on every rank.
        top_k_tail, divergence, beta, temperature, reduction, target, hard_weight, ignore_index, num_items_in_batch:
            as in :func:`vocab_parallel_distillation_loss` (``"batchmean"`` and ``"mean"``: the mean over kept
            tokens).
        logit_scale, softcap: the student's transform (scale after the cap); teacher_logit_scale, teacher_softcap:
            the teacher's.
        chunk_size: tokens per chunk (the ranks use the smallest rank's).
        group: the process group (default: the world).

    Raises:
        ValueError, TypeError: as :func:`vocab_parallel_distillation_loss`, on every rank alike; the teacher's
            tensors requiring grad are refused; ``input``'s and ``teacher_input``'s shapes and dtypes are agreed on.

    Example (on each rank)::

        loss = vocab_parallel_linear_distillation_loss(hidden, head_shard, teacher_hidden, teacher_head_shard,
                                                       target=labels, hard_weight=0.5, temperature=2.0)
    """
    return _linear_distillation(**locals(), with_entropy=False)[0]


def vocab_parallel_linear_distillation(
    input: torch.Tensor,
    linear_weight_shard: torch.Tensor,
    teacher_input: torch.Tensor | None = None,
    teacher_linear_weight_shard: torch.Tensor | None = None,
    *,
    linear_bias_shard: torch.Tensor | None = None,
    teacher_linear_bias_shard: torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
    teacher_log_probs: torch.Tensor | None = None,
    top_k_tail: str = "renormalize",
    divergence: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    target: torch.Tensor | None = None,
    hard_weight: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    group: Any = None,
) -> LinearDistillation:
    """:func:`vocab_parallel_linear_distillation_loss` and the student's entropy per token ``(...)`` at temperature
    T (0 at ignored tokens, no gradient), from the same pass: :class:`xent.LinearDistillation`, as
    :func:`xent.linear_distillation` returns it; one more all-reduce of a number per token and chunk."""
    loss, entropy = _linear_distillation(**locals(), with_entropy=True)
    return LinearDistillation(loss, cast(torch.Tensor, entropy))  # computed when asked for


def _linear_distillation(
    input: torch.Tensor,
    linear_weight_shard: torch.Tensor,
    teacher_input: torch.Tensor | None = None,
    teacher_linear_weight_shard: torch.Tensor | None = None,
    *,
    linear_bias_shard: torch.Tensor | None = None,
    teacher_linear_bias_shard: torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
    teacher_log_probs: torch.Tensor | None = None,
    top_k_tail: str = "renormalize",
    divergence: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    target: torch.Tensor | None = None,
    hard_weight: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    with_entropy: bool,
    chunk_size: int | None = None,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both public functions: the loss, and the entropy ``with_entropy``."""
    group = group_of(linear_weight_shard, group)
    terms, options = Terms(), None
    try:  # every local check, its error kept for the agreement step, so that every rank raises it
        teachers.check_teacher_given("teacher_input", teacher_input, teacher_indices, teacher_log_probs)
        linear_weight_shard = local_shard(linear_weight_shard, group, dim=0)
        if linear_bias_shard is not None:
            linear_bias_shard = local_shard(linear_bias_shard, group, dim=0)
        size = check_head(input, linear_weight_shard, linear_bias_shard,
                          ("input", "linear_weight_shard", "linear_bias_shard"))  # fmt: skip
        terms.agreed.update({"input's shape": tuple(input.shape), "input's dtype": input.dtype})
        if teacher_input is not None:
            if teacher_linear_weight_shard is None:
                raise ValueError("teacher_input is given without teacher_linear_weight_shard, the teacher's head")
            teacher_linear_weight_shard = local_shard(teacher_linear_weight_shard, group, dim=0)
            if teacher_linear_bias_shard is not None:
                teacher_linear_bias_shard = local_shard(teacher_linear_bias_shard, group, dim=0)
            names = ("teacher_input", "teacher_linear_weight_shard", "teacher_linear_bias_shard")
            teachers.refuse_grad("vocab_parallel_linear_distillation_loss", **dict(zip(names, (
                teacher_input, teacher_linear_weight_shard, teacher_linear_bias_shard), strict=True)))  # fmt: skip
            if check_head(teacher_input, teacher_linear_weight_shard, teacher_linear_bias_shard, names) != size:
                raise ValueError(
                    f"teacher_linear_weight_shard has {teacher_linear_weight_shard.shape[0]} rows but "
                    f"linear_weight_shard has {size}; the two heads must be split over the vocabulary alike"
                )
            if teacher_input.shape[:-1] != input.shape[:-1]:
                raise ValueError(
                    f"teacher_input has shape {checks.shape_str(teacher_input.shape)} but input has shape "
                    f"{checks.shape_str(input.shape)}; they must have the same batch shape (all but the last dim)"
                )
            terms.agreed.update({"teacher_input's shape": tuple(teacher_input.shape),
                                 "teacher_input's dtype": teacher_input.dtype})  # fmt: skip
        elif teacher_linear_weight_shard is not None or teacher_linear_bias_shard is not None:
            raise ValueError("the teacher's head is given without teacher_input, its hidden states")
        options = _check_locally(terms, "vocab_parallel_linear_distillation_loss", input.shape[:-1], size,
                                 teacher_indices, teacher_log_probs, top_k_tail, divergence, beta, temperature,
                                 reduction, target, ignore_index, hard_weight, num_items_in_batch)  # fmt: skip
        options = dataclasses.replace(options, spec=dataclasses.replace(
            options.spec, logit_scale=teachers.check_logit_scale("logit_scale", logit_scale),
            softcap=teachers.check_softcap("softcap", softcap),
            teacher_logit_scale=teachers.check_logit_scale("teacher_logit_scale", teacher_logit_scale),
            teacher_softcap=teachers.check_softcap("teacher_softcap", teacher_softcap)))  # fmt: skip
        spec = options.spec
        terms.agreed.update({"logit_scale": spec.logit_scale, "softcap": spec.softcap, "with_entropy": with_entropy,
                             "teacher_logit_scale": spec.teacher_logit_scale,
                             "teacher_softcap": spec.teacher_softcap})  # fmt: skip
        for name, bias in (
            ("linear_bias_shard", linear_bias_shard),
            ("teacher_linear_bias_shard", teacher_linear_bias_shard),
        ):
            terms.agreed[name] = None if bias is None else GIVEN
        checks.check_chunk_size(chunk_size)
        # three or four (c, V_r) buffers live at once: a quarter of the cross-entropy's chunk
        terms.chunk_size = chunk_size or max(1, default_chunk_size(input.shape[:-1].numel(), size, input.device) // 4)
    except Exception as error:  # whatever it is, every rank must hear of it, or the others hang
        terms.error = error
    agreement = agree(terms, group, collective_device(group, input, target))  # raises alike, or not
    options = _checked(options)
    _, call = _set_up(terms, group, options, input, agreement.sizes, agreement.chunk_size, with_entropy)
    flat = [None if x is None else x.reshape(-1, x.shape[-1]).contiguous() for x in (input, teacher_input)]
    teacher_head = (teacher_linear_weight_shard, teacher_linear_bias_shard)
    per_row, entropy = DistillShardLinearRows.apply(flat[0], linear_weight_shard, linear_bias_shard, flat[1],
                                                    *teacher_head, call)  # fmt: skip
    loss = _reduce(per_row, input.shape[:-1], options, call.kept)
    return loss, entropy.view(input.shape[:-1]) if with_entropy else None


# --- checks and set-up -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    """The checked options of a call, and its top-k teacher as given."""

    spec: DistillSpec
    reduction: str
    hard_weight: float
    num_items_in_batch: int | torch.Tensor | None
    top_k: tuple[torch.Tensor, torch.Tensor] | None


def _check_locally(
    terms: Terms,
    function: str,
    batch_shape: torch.Size,
    size: int,
    teacher_indices: torch.Tensor | None,
    teacher_log_probs: torch.Tensor | None,
    top_k_tail: str,
    divergence: str,
    beta: float | None,
    temperature: float,
    reduction: str,
    target: torch.Tensor | None,
    ignore_index: int,
    hard_weight: float,
    num_items_in_batch: int | torch.Tensor | None,
) -> _Options:
    """The checks that need no other rank, and what the ranks must agree on, into ``terms``. Raises the first
    failure. A top-k teacher's values are checked after the agreement, where the vocabulary's size is known."""
    temperature = teachers.check_distillation_options(temperature=temperature, reduction=reduction)
    spec = DistillSpec(divergence, teachers.check_divergence(divergence, beta), temperature,
                       tail=teachers.check_tail(top_k_tail))  # fmt: skip
    hard_weight = checks.check_in_range("hard_weight", hard_weight, 0.0)
    checks.check_ignore_index(ignore_index)
    num_items_in_batch = teachers.check_num_items(num_items_in_batch, reduction)
    top_k = None
    if teacher_indices is not None and teacher_log_probs is not None:
        teachers.refuse_grad(function, teacher_log_probs=teacher_log_probs)
        for name, tensor in (("teacher_indices", teacher_indices), ("teacher_log_probs", teacher_log_probs)):
            if checks.check_tensor(name, tensor).dim() == 0 or tensor.shape[:-1] != batch_shape:
                raise ValueError(f"{name} must have shape (..., k) with the batch shape {checks.shape_str(batch_shape)}"
                                 f" in front, got {checks.shape_str(tensor.shape)}")  # fmt: skip
        top_k = (teacher_indices, teacher_log_probs)
        # the values are checked after the agreement, on every rank alike: the ranks must check alike
        terms.agreed.update({"teacher_indices": teacher_indices, "teacher_log_probs": teacher_log_probs,
                             "value checks": value_checks_enabled(teacher_indices)})  # fmt: skip
    if target is not None:
        target = checks.check_tensor("target", target)
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
        if target.shape != batch_shape:
            raise ValueError(
                f"target has shape {checks.shape_str(target.shape)} but the batch shape (all but the last dimension "
                f"of the logits or hidden states) is {checks.shape_str(batch_shape)}"
            )
        terms.target = target.reshape(-1).long()
    terms.size, terms.ignore_index = size, ignore_index
    terms.agreed.update({"divergence": divergence, "beta": spec.beta, "temperature": temperature,
                         "top_k_tail": spec.tail, "reduction": reduction, "hard_weight": hard_weight,
                         "ignore_index": ignore_index, "target": None if target is None else target.long(),
                         "num_items_in_batch": agreed_value(num_items_in_batch)})  # fmt: skip
    return _Options(spec, reduction, hard_weight, num_items_in_batch, top_k)


def _checked(options: _Options | None) -> _Options:
    if options is None:  # pragma: no cover - the agreement raised
        raise RuntimeError("the agreement step passed without checked options")
    return options


def _set_up(
    terms: Terms,
    group: Any,
    options: _Options,
    like: torch.Tensor,
    sizes: list[int],
    chunk_size: int = 0,
    entropy: bool = False,
) -> tuple[DistillShard, DistillCall]:
    """After the agreement: the rank's shard, and the call — the kept rows, and a top-k teacher laid out and
    value-checked over the whole vocabulary."""
    vocab, rank = sum(sizes), torch.distributed.get_rank(group)
    shard = DistillShard(group, sum(sizes[:rank]), sizes[rank], vocab, options.spec, options.hard_weight)
    target = terms.target
    rows = like.shape[:-1].numel()
    kept = torch.ones(rows, dtype=torch.bool, device=like.device) if target is None else target != terms.ignore_index
    top_k = poisoned = None
    if options.top_k is not None:
        # every rank holds the same teacher (agreed), so every rank raises the same error here, or none does
        indices, log_probs = (x.reshape(rows, x.shape[-1]) for x in options.top_k)
        spec = options.spec
        ids, categories, valid = teachers.top_k_teacher(indices, log_probs, kept, vocab, spec.tail, spec.temperature,
                                                        accumulation_dtype(like.dtype))  # fmt: skip
        # value checks off: an id outside [0, V) is held by no shard; its row is NaN, never a finite wrong loss
        outside = valid & ((ids < 0) | (ids >= vocab))
        poisoned, ids = kept & outside.any(dim=1), torch.where(outside, torch.zeros_like(ids), ids)
        top_k = TopK(ids, categories, valid)
    hard_target = target if options.hard_weight else None  # hard_weight=0: the target masks, nothing more
    call = DistillCall(shard, kept, hard_target, top_k, poisoned, entropy, chunk_size)
    return shard, call


def _reduce(per_row: torch.Tensor, batch_shape: torch.Size, options: _Options, kept: torch.Tensor) -> torch.Tensor:
    if options.reduction == "none":
        return per_row.view(batch_shape)
    if options.num_items_in_batch is not None:  # as xent.distillation_loss: 0 items, a loss of 0
        items = torch.as_tensor(options.num_items_in_batch, dtype=per_row.dtype, device=per_row.device)
        return safe_divide(per_row.sum(), items)
    return reduce_loss(per_row, "mean" if options.reduction == "batchmean" else options.reduction, kept.sum())
