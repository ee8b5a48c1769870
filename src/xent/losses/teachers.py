"""The checks of the distillation losses: their options, and a teacher given whole or by its top-k."""

from __future__ import annotations

import math

import torch

from xent._config import value_checks_enabled
from xent.core import divergence as math_
from xent.losses import checks

DISTILLATION_REDUCTIONS = ("none", "batchmean", "mean", "sum")


def check_distillation_options(*, temperature: float, reduction: str) -> float:
    """The temperature and reduction of the distillation losses (and their module), checked."""
    temperature = checks.check_in_range(
        "temperature", temperature, 0.0, math.inf, low_inclusive=False, high_inclusive=False
    )
    checks.check_reduction(reduction, DISTILLATION_REDUCTIONS)
    return temperature


def check_divergence(divergence: object, beta: object) -> float:
    """``beta`` of ``divergence``: given (in (0, 1)) or 0.5 for ``"jsd"``, refused for the two KLs, whose β
    would mean something else in each library (TRL's β = 0 and 1 are the forward and reverse KL)."""
    if divergence not in math_.DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, math_.DIVERGENCES))}, got {divergence!r}")
    if divergence != "jsd":
        if beta is not None:
            raise ValueError(
                f"beta is read by divergence='jsd' only, got beta={checks.shown(beta)} with divergence="
                f"{divergence!r}; the generalized JSD's endpoints are explicit choices here: TRL's beta=0 is "
                "divergence='forward_kl', beta=1 is divergence='reverse_kl'"
            )
        return 0.5
    if beta is None:
        return 0.5
    return checks.check_in_range("beta", beta, 0.0, 1.0, low_inclusive=False, high_inclusive=False)


def check_num_items(num_items_in_batch: object, reduction: str) -> int | torch.Tensor | None:
    """``num_items_in_batch``: ``None``, a non-negative int or a one-element tensor (detached, shape ``()``), which
    divides the sum of a ``"mean"``/``"batchmean"`` loss."""
    if num_items_in_batch is None:
        return None
    if reduction not in ("mean", "batchmean"):
        raise ValueError(
            f"num_items_in_batch divides the sum of a mean; it needs reduction 'mean' or 'batchmean', got {reduction!r}"
        )
    if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 1:
        return num_items_in_batch.detach().reshape(())
    if isinstance(num_items_in_batch, int) and not isinstance(num_items_in_batch, bool) and num_items_in_batch >= 0:
        return num_items_in_batch
    if isinstance(num_items_in_batch, torch.Tensor):
        shown = f"shape {checks.shape_str(num_items_in_batch.shape)}"
    else:
        shown = checks.shown(num_items_in_batch)
    raise ValueError(f"num_items_in_batch must be a non-negative int or a one-element tensor, got {shown}")


def check_logit_scale(name: str, value: object) -> float:
    """A model's logit scale: a finite number > 0."""
    return checks.check_in_range(name, value, 0.0, math.inf, low_inclusive=False, high_inclusive=False)


def check_softcap(name: str, value: object) -> float | None:
    """A model's soft cap: ``None`` or a finite number > 0."""
    return None if value is None else check_logit_scale(name, value)


def check_tail(top_k_tail: object) -> str:
    if top_k_tail not in math_.TOP_K_TAILS:
        raise ValueError(f"top_k_tail must be one of {', '.join(map(repr, math_.TOP_K_TAILS))}, got {top_k_tail!r}")
    return str(top_k_tail)


def refuse_grad(function: str, **tensors: torch.Tensor | None) -> None:
    """The teacher is never differentiated: a teacher tensor that requires grad (grad mode on) is refused rather
    than silently left without a gradient."""
    if not torch.is_grad_enabled():
        return
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            raise ValueError(
                f"{name} requires grad, but {function} trains the student only and would leave the teacher without "
                f"a gradient; pass {name}.detach() or compute the teacher under torch.no_grad()"
            )


def check_teacher_given(dense: str, dense_tensor: object, indices: object, log_probs: object) -> None:
    """Exactly one teacher: ``dense`` (its logits or its head) or the top-k pair, complete."""
    top_k = indices is not None or log_probs is not None
    if top_k and dense_tensor is not None:
        raise ValueError(f"give the teacher either as {dense} or as teacher_indices and teacher_log_probs, not both")
    if not top_k and dense_tensor is None:
        raise ValueError(f"no teacher: give {dense}, or teacher_indices and teacher_log_probs")
    if top_k and (indices is None or log_probs is None):
        missing = "teacher_log_probs" if log_probs is None else "teacher_indices"
        raise ValueError(f"a top-k teacher needs both teacher_indices and teacher_log_probs; {missing} is missing")


def top_k_teacher(
    indices: object,
    log_probs: object,
    kept: torch.Tensor,
    num_classes: int,
    tail: str,
    temperature: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids (M, k), categories (M, k + 1), valid (M, k))`` of a top-k teacher already laid out as ``(M, k)``,
    checked at its kept rows. Ignored rows get a harmless stand-in (the first k classes, uniform), so that whatever
    they held cannot reach a gradient through ``0 · NaN``."""
    indices = checks.check_tensor("teacher_indices", indices)
    log_probs = checks.check_floating("teacher_log_probs", log_probs)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"teacher_indices must hold integer class ids, got dtype {indices.dtype}")
    if indices.shape != log_probs.shape:
        raise ValueError(
            f"teacher_indices has shape {checks.shape_str(indices.shape)} but teacher_log_probs has shape "
            f"{checks.shape_str(log_probs.shape)}; they must be equal"
        )
    k = indices.shape[-1]
    if not 0 < k <= num_classes:
        raise ValueError(f"a top-k teacher needs 0 < k <= {num_classes} (the classes), got k={k}")
    indices = indices.long()
    log_probs = log_probs.to(dtype)
    valid = log_probs > -math.inf
    _check_top_k_values(indices, log_probs, valid, kept, num_classes, tail)
    standin = torch.arange(k, device=indices.device).expand_as(indices)
    row_kept = kept.unsqueeze(1)
    indices = torch.where(row_kept, indices, standin)
    valid = valid | ~row_kept
    log_probs = torch.where(row_kept, log_probs, torch.full_like(log_probs, -math.log(k)))
    ids = torch.where(valid, indices, torch.zeros_like(indices))  # padding ids are never read; keep them in range
    return ids, math_.teacher_categories(log_probs, valid, tail, temperature), valid


def _check_top_k_values(
    indices: torch.Tensor,
    log_probs: torch.Tensor,
    valid: torch.Tensor,
    kept: torch.Tensor,
    num_classes: int,
    tail: str,
) -> None:
    """Ids in range and distinct, log-probabilities ≤ 0 (and summing to at most 1 for ``"bucket"``), a support in
    every row for ``"renormalize"`` — at kept rows and entries that are not padding. Needs a host sync, so it obeys
    the value-check switch."""
    if not value_checks_enabled(indices) or indices.numel() == 0:
        return
    entry = valid & kept.unsqueeze(1)

    def first(bad: torch.Tensor) -> int:
        return int(bad.nonzero()[0, 0])

    out_of_range = entry & ((indices < 0) | (indices >= num_classes))
    if bool(out_of_range.any()):
        value = int(indices[out_of_range][0])
        raise ValueError(f"teacher_indices holds class id {value}, outside [0, {num_classes})")
    bad = kept.unsqueeze(1) & (torch.isnan(log_probs) | (log_probs > _ROUNDING))
    if bool(bad.any()):
        found = float(log_probs[bad][0])
        raise ValueError(f"teacher_log_probs must hold log-probabilities (<= 0, not NaN), found {found:g}")
    ordered = torch.where(entry, indices, -1 - torch.arange(indices.shape[1], device=indices.device)).sort(dim=1)
    repeated = (ordered.values[:, 1:] == ordered.values[:, :-1]) & (ordered.values[:, 1:] >= 0)
    if bool(repeated.any()):
        row = first(repeated.any(dim=1, keepdim=True))
        value = int(ordered.values[row, 1:][repeated[row]][0])
        raise ValueError(f"teacher_indices repeats class id {value} in row {row}; a top-k support's ids are distinct")
    if tail == "renormalize":
        empty = kept & ~valid.any(dim=1)
        if bool(empty.any()):
            raise ValueError(
                f"teacher_log_probs of row {first(empty.unsqueeze(1))} are all -inf (padding): "
                "top_k_tail='renormalize' needs a support; 'bucket' takes an empty one (the teacher's mass all in the "
                "tail)"
            )
    else:
        mass = torch.logsumexp(log_probs.masked_fill(~entry, -math.inf), dim=1)
        over = kept & (mass > _ROUNDING)
        if bool(over.any()):
            row = first(over.unsqueeze(1))
            raise ValueError(
                f"teacher_log_probs of row {row} hold probabilities summing to {math.exp(float(mass[row])):.6g} > 1: "
                "top_k_tail='bucket' needs the top-k's own probabilities (their remainder is the tail)"
            )


# How far above 0 a log-probability (or a log of the top-k's total) may round: the probabilities of a half-precision
# teacher summed in float32.
_ROUNDING = 1e-3
