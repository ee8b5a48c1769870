r"""Knowledge distillation: a student matches a teacher's softened distribution — forward KL, reverse KL or the
generalized Jensen–Shannon divergence, from the teacher's logits, probabilities, head or top-k.

The divergences and their conventions are defined in ``xent.core.divergence``; both functions here compute

.. math::
    \ell_n = T^2\, D\bigl(q_n, p_n\bigr) + \lambda \operatorname{CE}(z_n, y_n), \qquad
    p_n = \operatorname{softmax}(z_n / T), \quad q_n = \operatorname{softmax}(z_{t,n} / T)

per position, the :math:`T^2` keeping the gradient's size independent of :math:`T` (Hinton et al.). TRL's
``generalized_jsd_loss`` and ``DistillationTrainer`` have no :math:`T^2`: their value is xent's divided by
:math:`T^2`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, cast

import torch

from xent._config import value_checks_enabled
from xent.core import divergence as math_
from xent.core.autocast import autocast_off, cast_for_linear, float32_under_autocast, result_dtype
from xent.core.reduce import accumulation_dtype, safe_divide
from xent.kernels import dispatch, ops
from xent.kernels import distill as kernel
from xent.kernels.dispatch import Impl
from xent.kernels.linear import default_chunk_size
from xent.losses import checks, teachers
from xent.losses.linear import canonicalize_linear
from xent.losses.softmax import class_dimension, cross_entropy
from xent.losses.teachers import DISTILLATION_REDUCTIONS, check_distillation_options

__all__ = [
    "DISTILLATION_REDUCTIONS",
    "LinearDistillation",
    "check_distillation_options",
    "distillation_loss",
    "linear_distillation",
    "linear_distillation_loss",
]


def _divergence_rows(logits: torch.Tensor, teacher: Any, spec: kernel.DistillSpec) -> torch.Tensor:
    """Per-row ``T² D`` of logits ``(M, C)`` in the accumulation dtype, differentiable by autograd (twice too):
    ``teacher`` is the teacher's logits ``(M, C)`` or a top-k teacher's ``(ids, categories, valid)``. Probabilities
    of exactly 0 are clamped at the dtype's lowest log-probability, so that no ``0 · inf`` reaches a gradient."""
    lowest = torch.finfo(logits.dtype).min
    z = logits / spec.temperature
    if isinstance(teacher, torch.Tensor):
        log_p = torch.log_softmax(z, dim=1).clamp(min=lowest)
        log_q = torch.log_softmax(teacher / spec.temperature, dim=1).clamp(min=lowest)
        terms, _ = math_.divergence_terms(log_p, log_q, spec.divergence, spec.beta)
        return terms.sum(dim=1) * spec.temperature**2
    ids, categories, valid = teacher
    counts = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
    support = counts.scatter_add_(1, ids, valid.to(torch.int32)) > 0  # padding ids may repeat a support id
    lse_tail = torch.logsumexp(z.masked_fill(support, -math.inf), dim=1)
    rows = math_.top_k_rows(
        z.gather(1, ids),
        torch.logsumexp(z, dim=1),
        lse_tail,
        categories,
        valid,
        spec.divergence,
        spec.beta,
        spec.tail,
        differentiable=True,
    )
    return rows.loss * spec.temperature**2


@float32_under_autocast
def distillation_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    teacher_is_probs: bool = False,
    teacher_indices: torch.Tensor | None = None,
    teacher_log_probs: torch.Tensor | None = None,
    top_k_tail: str = "renormalize",
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Distillation loss :math:`T^2 D(q, p)` between a student's and a teacher's distributions over classes.

    .. math::
        \ell_n = T^2\, D(q_n, p_n) \;[+\; \lambda \operatorname{CE}(z_n, y_n)], \qquad
        p_n = \operatorname{softmax}(z_n / T), \quad q_n = \operatorname{softmax}(z_{t,n} / T)

    with :math:`D` one of (``xent.core.divergence``):

    - ``"forward_kl"`` (the default): :math:`\mathrm{KL}(q \| p)`, Hinton et al.'s distillation, mass-covering;
    - ``"reverse_kl"``: :math:`\mathrm{KL}(p \| q)`, mode-seeking (MiniLLM, on-policy distillation);
    - ``"jsd"``: :math:`\beta\, \mathrm{KL}(q \| m) + (1 - \beta)\, \mathrm{KL}(p \| m)`,
      :math:`m = \beta q + (1 - \beta) p` (GKD; TRL's and Liger's generalized JSD), :math:`0 < \beta < 1`.

    **β conventions.** TRL's ``beta`` selects the divergence: 0 is the forward KL, 1 the reverse KL, anything between
    the JSD above. Its interior formula tends to 0 as β → 0 or 1, so β = 1e-6 is not "almost the forward KL": it is
    almost no loss. Here the endpoints are named divergences, and ``beta`` is ``"jsd"``'s only, in (0, 1).
    **Temperature.** The :math:`T^2` factor keeps the gradient's magnitude independent of :math:`T`, so the loss can
    be mixed with a hard-label cross-entropy without re-tuning its weight; TRL's divergence has none (divide by
    :math:`T^2` to compare). Terms with probability 0 contribute 0 (``xlogy``); a divergence that is infinite (the
    forward KL where the student gives probability 0 to a class the teacher does not, the reverse KL the other way
    round) comes out enormous, never NaN: the log of 0 is taken as the dtype's lowest number (the Triton kernel gives
    ``inf``). The teacher is not differentiated: a teacher that requires grad (with grad mode on) raises rather than
    silently getting no gradient.

    Args:
        student_logits: ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        teacher: the teacher's logits, same shape; or its probabilities with ``teacher_is_probs=True``, sharpened
            or softened as :math:`q \propto q_0^{1/T}`. ``None`` for a top-k teacher.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: ``"jsd"``'s :math:`\beta \in (0, 1)`, 0.5 by default; refused with the KLs.
        temperature: :math:`T > 0`; Hinton et al. use values from 1 to 20.
        reduction: ``"batchmean"`` (the per-sample divergence, summed over positions :math:`d_1 \cdots d_K`,
            averaged over the batch: PyTorch's ``kl_div`` convention, the sum over everything divided by N when
            nothing is ignored; for ``(N, C)`` logits the mean over kept rows), ``"mean"`` (per position, averaged
            over the kept positions), ``"sum"``, or ``"none"`` (per position, the batch shape).
        teacher_is_probs: ``teacher`` holds probabilities, not logits.
        teacher_indices, teacher_log_probs: a top-k teacher (a teacher served over the network, or precomputed):
            its k class ids and their log-probabilities at each position, shaped like ``student_logits`` with the
            class dimension of size k; entries of log-probability ``-inf`` are padding. They are taken at the
            distillation temperature's base: the top-k distribution is softened as :math:`q \propto q^{1/T}` over
            its categories.
        top_k_tail: ``"renormalize"`` (the teacher renormalised over its top-k) or ``"bucket"`` (the mass outside
            the top-k as one more category, the student's too); see ``xent.core.divergence``.
        target: class indices of the batch shape: positions whose target is ``ignore_index`` drop out of everything
            (padding, prompt tokens), and with ``hard_weight > 0`` the hard-label term
            :math:`\lambda \operatorname{CE}(z, y)` (at :math:`T = 1`, reduced as cross-entropy's ``"mean"`` for
            ``"mean"``/``"batchmean"``) is added. ``hard_weight=0`` uses ``target`` for masking only.
        ignore_index: the target value of positions to leave out.
        hard_weight: :math:`\lambda \ge 0`.
        num_items_in_batch: with ``"mean"``/``"batchmean"``, divide the sum by this count instead (the kept
            positions of the whole accumulated batch: gradient accumulation's correct mean, as transformers and TRL
            pass it).

    References:
        Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. NeurIPS Deep Learning Workshop 2015.
        Agarwal et al. On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes (GKD).
        ICLR 2024. Gu et al. MiniLLM: Knowledge Distillation of Large Language Models. ICLR 2024.
    """
    temperature = check_distillation_options(temperature=temperature, reduction=reduction)
    beta = teachers.check_divergence(divergence, beta)
    tail = teachers.check_tail(top_k_tail)
    hard_weight = checks.check_in_range("hard_weight", hard_weight, 0.0)
    class_dim = class_dimension(student_logits, "student_logits")
    teachers.check_teacher_given("teacher", teacher, teacher_indices, teacher_log_probs)
    teachers.refuse_grad("distillation_loss", teacher=teacher, teacher_log_probs=teacher_log_probs)
    num_items_in_batch = teachers.check_num_items(num_items_in_batch, reduction)
    num_classes = student_logits.shape[class_dim]
    batch_shape = student_logits.movedim(class_dim, -1).shape[:-1]
    flat = student_logits.movedim(class_dim, -1).reshape(-1, num_classes)
    _, kept = _kept(target, batch_shape, ignore_index, num_classes, student_logits.device)
    dtype = accumulation_dtype(student_logits.dtype)
    spec = kernel.DistillSpec(divergence, beta, temperature, tail=tail)
    if teacher is not None:
        teacher = checks.check_floating("teacher", teacher)
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"teacher has shape {checks.shape_str(teacher.shape)} but student_logits has shape "
                f"{checks.shape_str(student_logits.shape)}; they must be equal"
            )
        flat_teacher = teacher.movedim(class_dim, -1).reshape(-1, num_classes).to(dtype)
        if teacher_is_probs:
            checks.check_probabilities("teacher", teacher)
            _check_teacher_mass(flat_teacher, kept, batch_shape)
            flat_teacher = torch.log(flat_teacher)  # log 0 = -inf: the class keeps probability 0 at any temperature
        # ignored rows are read as a uniform teacher: whatever they hold cannot reach a gradient through 0 · NaN
        teacher_rows: Any = torch.where(kept.unsqueeze(1), flat_teacher, torch.zeros((), dtype=dtype))
    else:
        top_k_shape = (*batch_shape, checks.check_tensor("teacher_indices", teacher_indices).shape[class_dim])
        indices = _rows_of(teacher_indices, class_dim, top_k_shape, "teacher_indices", student_logits.shape)
        log_probs = _rows_of(teacher_log_probs, class_dim, top_k_shape, "teacher_log_probs", student_logits.shape)
        teacher_rows = teachers.top_k_teacher(indices, log_probs, kept, num_classes, tail, temperature, dtype)
    rows = _divergence_rows(flat.to(dtype), teacher_rows, spec)
    rows = torch.where(kept, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        loss = rows.view(batch_shape)
        if target is not None and hard_weight:
            hard = cross_entropy(student_logits, target, ignore_index=ignore_index, reduction="none")
            loss = loss + hard_weight * hard.to(loss.dtype)
        return loss.to(student_logits.dtype)
    total = rows.sum()
    hard_total = None
    if target is not None and hard_weight:
        hard_total = hard_weight * cross_entropy(student_logits, target, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        loss = total if hard_total is None else total + hard_total
        return loss.to(student_logits.dtype)
    if num_items_in_batch is not None:
        count = torch.as_tensor(num_items_in_batch, dtype=dtype, device=student_logits.device)
        loss = total if hard_total is None else total + hard_total
        return safe_divide(loss, count).to(student_logits.dtype)
    count = kept.sum().to(dtype)
    positions_per_sample = batch_shape[1:].numel() if reduction == "batchmean" and len(batch_shape) > 1 else 1
    loss = safe_divide(total * positions_per_sample, count)
    if hard_total is not None:
        loss = loss + safe_divide(hard_total.to(dtype), count)
    return loss.to(student_logits.dtype)


def _kept(
    target: torch.Tensor | None,
    batch_shape: torch.Size,
    ignore_index: int,
    num_classes: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(target (M,), kept (M,))``: the flattened target (None without one) and which positions count."""
    ignore_index = checks.check_ignore_index(ignore_index)
    if target is None:
        return None, torch.ones(batch_shape.numel(), dtype=torch.bool, device=device)
    target = checks.check_tensor("target", target)
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target of a distillation loss holds class indices, got dtype {target.dtype}")
    if target.shape != batch_shape:
        raise ValueError(
            f"target has shape {checks.shape_str(target.shape)}; expected the batch shape "
            f"{checks.shape_str(batch_shape)} (one class index per position)"
        )
    flat = target.reshape(-1).long()
    checks.check_class_indices(flat, num_classes, ignore_index)
    return flat, flat != ignore_index


def _rows_of(
    tensor: object, class_dim: int, shape: tuple[int, ...], name: str, student_shape: torch.Size
) -> torch.Tensor:
    """A top-k tensor laid out like the logits (class dimension of size k) as ``(M, k)`` rows."""
    tensor = checks.check_tensor(name, tensor)
    expected = list(student_shape)
    expected[class_dim] = tensor.shape[class_dim] if tensor.dim() == len(student_shape) else -1
    if list(tensor.shape) != expected:
        raise ValueError(
            f"{name} has shape {checks.shape_str(tensor.shape)}; expected student_logits' shape "
            f"{checks.shape_str(student_shape)} with the class dimension ({class_dim}) of size k"
        )
    return tensor.movedim(class_dim, -1).reshape(-1, shape[-1])


def _check_teacher_mass(teacher: torch.Tensor, kept: torch.Tensor, batch_shape: torch.Size) -> None:
    """Every kept teacher distribution has some probability mass: an all-zero row has no softened distribution
    (its normalisation is 0 / 0). Needs a host sync, so it obeys the value-check switch."""
    if not value_checks_enabled(teacher) or teacher.numel() == 0:
        return
    empty = kept & (teacher.sum(1) <= 0)
    if bool(empty.any()):
        index = int(empty.nonzero()[0, 0])
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), batch_shape)) if batch_shape else ()
        raise ValueError(
            f"teacher holds probabilities (teacher_is_probs=True) but its distribution at {position} sums to 0; "
            "every distribution needs some probability mass"
        )


def linear_distillation_loss(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    teacher_input: torch.Tensor | None = None,
    teacher_linear_weight: torch.Tensor | None = None,
    *,
    linear_bias: torch.Tensor | None = None,
    teacher_linear_bias: torch.Tensor | None = None,
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
    impl: Impl | None = None,
) -> torch.Tensor:
    r"""Distillation of a language model's head into another's, without either's ``N × V`` logits.

    .. math::
        \ell_n = T^2\, D\bigl(q_n, p_n\bigr) + \lambda \operatorname{CE}(z_n, y_n), \qquad
        z = s \operatorname{cap}(x W^\top + b), \quad p = \operatorname{softmax}(z / T), \quad
        q = \operatorname{softmax}(s_t \operatorname{cap}_t(x_t W_t^\top + b_t) / T)

    with :math:`\operatorname{cap}(x) = c \tanh(x / c)` (Gemma 2's soft cap; none when ``softcap`` is None) and the
    divergence :math:`D` of :func:`distillation_loss`. Equal, in value and in the gradients of ``input``,
    ``linear_weight`` and ``linear_bias``, to :func:`distillation_loss` on the materialised logits of both heads
    with the same options (tokens are the rows: ``"batchmean"`` and ``"mean"`` are both the mean over kept tokens).
    Tokens go in chunks; each chunk's student and teacher logits are formed, their divergence and the student's
    gradient computed block by block in cache, and the gradient GEMMs run on it (``xent.kernels.distill``): four
    GEMMs of :math:`N V D` in all, the floor, and two ``c × V`` chunks of memory (one with a top-k teacher).

    The scale and the cap apply in the order :math:`s \operatorname{cap}(x)`; TRL reads them as
    :math:`\operatorname{cap}(s x)`, which is :math:`s \operatorname{cap}_{c/s}(x)`: pass ``softcap=c / s``.

    Args:
        input: the student's hidden states ``(..., D)``.
        linear_weight: the student's head ``(V, D)``.
        teacher_input: the teacher's hidden states ``(..., D_t)``, same batch shape (``D_t`` may differ).
        teacher_linear_weight: the teacher's head ``(V, D_t)``, same vocabulary.
        linear_bias, teacher_linear_bias: ``(V,)`` or ``None``.
        teacher_indices, teacher_log_probs: a top-k teacher ``(..., k)`` instead of the teacher's head; see
            :func:`distillation_loss`. Fused over the student's head: its softmax is still normalised over all V.
        top_k_tail, divergence, beta, temperature: as :func:`distillation_loss`.
        reduction: ``"batchmean"`` and ``"mean"`` (the mean over kept tokens), ``"sum"`` or ``"none"`` (the batch
            shape ``(...)``).
        logit_scale, softcap: the student's logit transform :math:`s`, :math:`c`; teacher_logit_scale,
            teacher_softcap: the teacher's.
        target: class indices ``(...)``: tokens whose target is ``ignore_index`` drop out of everything; the
            hard-label term :math:`\lambda \operatorname{CE}(z, y)` (at :math:`T = 1`) is added for the others.
        hard_weight: :math:`\lambda \ge 0` (0: ``target`` masks only).
        ignore_index: the target of tokens to leave out.
        num_items_in_batch: with ``"mean"``/``"batchmean"``, divide the sum by this count instead (gradient
            accumulation's correct mean).
        chunk_size: tokens per chunk, as in :func:`xent.linear_cross_entropy`.
        impl: ``None`` (the fused kernels: Triton on CUDA when installed, chunked PyTorch otherwise), ``"chunked"``,
            ``"triton"``, or ``"reference"`` (:func:`distillation_loss` on the materialised logits).

    Example:
        >>> student, teacher = torch.randn(4, 64, 256, requires_grad=True), torch.randn(4, 64, 512)
        >>> W, W_t = torch.randn(32000, 256, requires_grad=True), torch.randn(32000, 512)
        >>> xent.linear_distillation_loss(student, W, teacher, W_t, divergence="jsd", beta=0.5).backward()
    """
    return _linear_distillation(**locals(), with_entropy=False)[0]


class LinearDistillation(NamedTuple):
    """What :func:`linear_distillation` returns."""

    loss: torch.Tensor
    """The loss, as :func:`linear_distillation_loss` returns it."""
    entropy: torch.Tensor
    """The student's entropy :math:`-\\sum_j p_j \\log p_j` at temperature T per token ``(...)``: 0 at ignored
    tokens, float32 (float64 for float64 inputs), no gradient — a metric, as TRL logs it."""


def linear_distillation(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    teacher_input: torch.Tensor | None = None,
    teacher_linear_weight: torch.Tensor | None = None,
    *,
    linear_bias: torch.Tensor | None = None,
    teacher_linear_bias: torch.Tensor | None = None,
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
    impl: Impl | None = None,
) -> LinearDistillation:
    r""":func:`linear_distillation_loss` and the student's entropy per token, from the same pass over the logits
    (one more dot product per token): the divergence a distillation trainer minimises and the entropy it logs.

    Takes the arguments of :func:`linear_distillation_loss`; returns :class:`LinearDistillation` ``(loss,
    entropy)``.

    Example:
        >>> student, teacher = torch.randn(2, 16, 64, requires_grad=True), torch.randn(2, 16, 96)
        >>> W, W_t = torch.randn(1000, 64, requires_grad=True), torch.randn(1000, 96)
        >>> loss, entropy = xent.linear_distillation(student, W, teacher, W_t, divergence="reverse_kl")
        >>> loss.backward()
        >>> entropy.shape
        torch.Size([2, 16])
    """
    loss, entropy = _linear_distillation(**locals(), with_entropy=True)
    return LinearDistillation(loss, cast(torch.Tensor, entropy))  # computed when asked for


def _linear_distillation(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    teacher_input: torch.Tensor | None = None,
    teacher_linear_weight: torch.Tensor | None = None,
    *,
    linear_bias: torch.Tensor | None = None,
    teacher_linear_bias: torch.Tensor | None = None,
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
    impl: Impl | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both public functions: the loss, and the entropy ``with_entropy``."""
    temperature = check_distillation_options(temperature=temperature, reduction=reduction)
    beta = teachers.check_divergence(divergence, beta)
    tail = teachers.check_tail(top_k_tail)
    hard_weight = checks.check_in_range("hard_weight", hard_weight, 0.0)
    num_items_in_batch = teachers.check_num_items(num_items_in_batch, reduction)
    checks.check_chunk_size(chunk_size)
    impl = dispatch.check_impl(impl)
    spec = kernel.DistillSpec(
        divergence,
        beta,
        temperature,
        teachers.check_logit_scale("logit_scale", logit_scale),
        teachers.check_softcap("softcap", softcap),
        teachers.check_logit_scale("teacher_logit_scale", teacher_logit_scale),
        teachers.check_softcap("teacher_softcap", teacher_softcap),
        tail,
    )
    teachers.check_teacher_given(
        "teacher_input and teacher_linear_weight", teacher_input, teacher_indices, teacher_log_probs
    )
    if (teacher_input is None) != (teacher_linear_weight is None):
        raise ValueError("a teacher head needs both teacher_input and teacher_linear_weight")
    teachers.refuse_grad(
        "linear_distillation_loss",
        teacher_input=teacher_input,
        teacher_linear_weight=teacher_linear_weight,
        teacher_linear_bias=teacher_linear_bias,
        teacher_log_probs=teacher_log_probs,
    )
    out_dtype = result_dtype(checks.check_floating("input", input))
    input, linear_weight, linear_bias = (
        cast_for_linear(input),
        cast_for_linear(linear_weight),
        cast_for_linear(linear_bias),
    )
    labels = target if target is not None else torch.zeros(input.shape[:-1], dtype=torch.long, device=input.device)
    flat_input, flat_labels, batch_shape = canonicalize_linear(input, linear_weight, linear_bias, labels)
    if flat_labels.is_floating_point():
        raise TypeError("target of linear_distillation_loss holds class indices, not probabilities")
    vocab = linear_weight.shape[0]
    flat_target, kept = _kept(target, batch_shape, ignore_index, vocab, input.device)
    dtype = accumulation_dtype(flat_input.dtype)
    teacher_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    if teacher_input is not None and teacher_linear_weight is not None:
        teacher_input = cast_for_linear(checks.check_floating("teacher_input", teacher_input))
        teacher_linear_weight, teacher_linear_bias = (
            cast_for_linear(teacher_linear_weight),
            cast_for_linear(teacher_linear_bias),
        )
        if teacher_input.shape[:-1] != batch_shape:
            raise ValueError(
                f"teacher_input has shape {checks.shape_str(teacher_input.shape)} but input has shape "
                f"{checks.shape_str(input.shape)}; they must have the same batch shape (all but the last dimension)"
            )
        names = ("teacher_input", "teacher_linear_weight", "teacher_linear_bias")
        flat_teacher, _, _ = canonicalize_linear(
            teacher_input, teacher_linear_weight, teacher_linear_bias, labels, names
        )
        if teacher_linear_weight.shape[0] != vocab:
            raise ValueError(
                f"teacher_linear_weight has {teacher_linear_weight.shape[0]} classes but linear_weight has {vocab}; "
                "student and teacher must share the vocabulary"
            )
        teacher_tensors = (flat_teacher, teacher_linear_weight, teacher_linear_bias)
        teacher: kernel.DenseTeacher | kernel.TopKTeacher = kernel.DenseTeacher(*teacher_tensors)
    else:
        indices = checks.check_tensor("teacher_indices", teacher_indices)
        log_probs = checks.check_tensor("teacher_log_probs", teacher_log_probs)
        for name, tensor in (("teacher_indices", indices), ("teacher_log_probs", log_probs)):
            if tensor.shape[:-1] != batch_shape:
                raise ValueError(
                    f"{name} has shape {checks.shape_str(tensor.shape)}; expected the batch shape "
                    f"{checks.shape_str(batch_shape)} followed by k"
                )
        teacher = kernel.TopKTeacher(
            *teachers.top_k_teacher(
                indices.reshape(-1, indices.shape[-1]),
                log_probs.reshape(-1, log_probs.shape[-1]),
                kept,
                vocab,
                tail,
                temperature,
                dtype,
            )
        )
    entropy: torch.Tensor | None = None
    with autocast_off(input):
        if impl == "reference":
            reference_teacher: tuple[torch.Tensor | None, ...] = (
                teacher_tensors
                if teacher_tensors is not None
                else (indices.reshape(-1, indices.shape[-1]), log_probs.reshape(-1, log_probs.shape[-1]))
            )
            loss, entropy = _linear_reference(
                flat_input,
                linear_weight,
                linear_bias,
                reference_teacher,
                spec,
                flat_target,
                hard_weight,
                ignore_index,
                reduction,
                num_items_in_batch,
            )
        else:
            fused = _fused_impl(impl, flat_input.device)
            if fused == "chunked" and isinstance(teacher, kernel.DenseTeacher):
                heads = ((linear_bias, spec.softcap), (teacher.bias, spec.teacher_softcap))
                spec = dataclasses.replace(spec, finite_logits=all(_finite(*head) for head in heads))
            if reduction in ("batchmean", "mean"):
                count = (
                    torch.as_tensor(num_items_in_batch, dtype=dtype, device=input.device)
                    if num_items_in_batch is not None
                    else kept.sum().to(dtype)
                )
                factor = safe_divide(torch.ones((), dtype=dtype, device=input.device), count)
            else:
                factor = torch.ones((), dtype=dtype, device=input.device)
            hard = None
            if flat_target is not None and hard_weight:
                safe_target = torch.where(kept, flat_target, torch.zeros_like(flat_target))
                hard = kernel.HardLabels(safe_target, kept.to(dtype) * hard_weight)
            buffers = 2 if isinstance(teacher, kernel.DenseTeacher) else 1
            chunk_size = chunk_size or max(
                1, default_chunk_size(flat_input.shape[0], vocab, flat_input.device, 4) // buffers
            )
            loss, entropy = ops.fused_linear_distillation(
                flat_input, linear_weight, linear_bias, teacher, spec, factor, kept, hard,
                "none" if reduction == "none" else "sum", fused, chunk_size, with_entropy,
            )  # fmt: skip
    loss = (loss.view(batch_shape) if reduction == "none" else loss).to(out_dtype)
    return loss, None if entropy is None else entropy.view(batch_shape)


def _fused_impl(impl: Impl | None, device: torch.device) -> Impl:
    """The fused implementation that runs (``None``: the device's), refused, saying why, where Triton cannot run."""
    fused = impl or dispatch.fused_impl(device)
    if fused == "triton":
        dispatch.row_kernel("triton", device)
    return fused


def _finite(bias: torch.Tensor | None, cap: float | None) -> bool:
    """Whether a head's logits are finite (for finite hidden states and weight): no bias entry is ``-inf`` (a masked
    class), or a cap bounds them. A compiled call cannot read the bias and takes the general way."""
    if bias is None or cap is not None:
        return True
    return not torch.compiler.is_compiling() and bool(torch.isfinite(bias).all())


def _transform(x: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    """``scale · cap · tanh(x / cap)``, differentiable."""
    if cap is not None:
        x = cap * torch.tanh(x / cap)
    return x * scale if scale != 1.0 else x


def _linear_reference(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: tuple[torch.Tensor | None, ...],
    spec: kernel.DistillSpec,
    target: torch.Tensor | None,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The materialised computation: the student's logits (and the teacher's), transformed, then
    :func:`distillation_loss`; and the student's entropy (0 at ignored tokens)."""
    dtype = accumulation_dtype(input.dtype)
    logits = _transform(torch.nn.functional.linear(input, weight, bias).to(dtype), spec.logit_scale, spec.softcap)
    options: dict[str, Any] = dict(
        divergence=spec.divergence,
        temperature=spec.temperature,
        reduction=reduction,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
        target=target,
        num_items_in_batch=num_items_in_batch,
        top_k_tail=spec.tail,
    )
    if spec.divergence == "jsd":
        options["beta"] = spec.beta
    if len(teacher) == 3:
        teacher_input, teacher_weight, teacher_bias = cast(
            tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], teacher
        )
        with torch.no_grad():
            teacher_logits = torch.nn.functional.linear(teacher_input, teacher_weight, teacher_bias).to(dtype)
            teacher_logits = _transform(teacher_logits, spec.teacher_logit_scale, spec.teacher_softcap)
        loss = distillation_loss(logits, teacher_logits, **options)
    else:
        indices, log_probs = cast(tuple[torch.Tensor, torch.Tensor], teacher)
        loss = distillation_loss(logits, teacher_indices=indices, teacher_log_probs=log_probs, **options)
    with torch.no_grad():
        log_p = torch.log_softmax(logits.detach() / spec.temperature, dim=1)
        entropy = -torch.special.xlogy(log_p.exp(), log_p.exp()).sum(1)
        if target is not None:
            entropy = torch.where(target != ignore_index, entropy, torch.zeros((), dtype=dtype))
    return loss, entropy
