"""Knowledge distillation: match a teacher's softened distribution."""

from __future__ import annotations

import torch

from xent._config import value_checks_enabled
from xent.core.autocast import autocast_off, cast_for_linear, float32_under_autocast, result_dtype
from xent.core.reduce import accumulation_dtype, reduce_loss, safe_divide
from xent.core.rowloss import RowLoss, mean_denominator
from xent.kernels import dispatch
from xent.kernels.dispatch import Impl
from xent.kernels.distill import distillation_chunk_loss
from xent.kernels.linear import default_chunk_size, fused_linear_loss
from xent.losses import checks
from xent.losses.linear import canonicalize_linear
from xent.losses.softmax import checked_options, class_dimension, cross_entropy

DISTILLATION_REDUCTIONS = ("none", "batchmean", "mean", "sum")


def check_distillation_options(*, temperature: float, reduction: str) -> float:
    """The temperature and reduction of the distillation losses (and their module), checked."""
    temperature = checks.check_in_range("temperature", temperature, 0.0, low_inclusive=False)
    checks.check_reduction(reduction, DISTILLATION_REDUCTIONS)
    return temperature


@float32_under_autocast
def distillation_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    teacher_is_probs: bool = False,
) -> torch.Tensor:
    r"""Distillation loss: :math:`T^2\, \mathrm{KL}\bigl(\operatorname{softmax}(z_t / T) \,\|\,
    \operatorname{softmax}(z_s / T)\bigr)`.

    .. math::
        \ell_n = T^2 \sum_c q_{n,c} \bigl(\log q_{n,c} - \log p_{n,c}\bigr), \qquad
        p_n = \operatorname{softmax}(z_{s,n} / T), \quad q_n = \operatorname{softmax}(z_{t,n} / T)

    The :math:`T^2` keeps the gradient's magnitude independent of the temperature, so the loss can be mixed with a
    hard-label cross-entropy without re-tuning its weight. With a one-hot teacher and :math:`T = 1` it equals
    cross-entropy. Terms with :math:`q = 0` contribute 0 (``xlogy``). The teacher is not differentiated: a teacher
    that requires grad (with grad mode on) raises rather than silently getting no gradient — detach it, or compute it
    under ``torch.no_grad()``, which also saves the memory of its graph.

    Args:
        student_logits: ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        teacher: the teacher's logits, same shape; or its probabilities with ``teacher_is_probs=True``, which are
            sharpened or softened as :math:`q \propto q_0^{1/T}`.
        temperature: :math:`T > 0`; default 1. Hinton et al. use values from 1 to 20.
        reduction: ``"batchmean"`` (sum over everything divided by N: the true KL per sample, the default),
            ``"mean"`` (per position, averaged over :math:`N d_1 \cdots d_K`), ``"sum"``, or ``"none"``
            (per position, the batch shape).
        teacher_is_probs: ``teacher`` holds probabilities, not logits.

    References:
        Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. NeurIPS Deep Learning Workshop 2015.
    """
    temperature = check_distillation_options(temperature=temperature, reduction=reduction)
    class_dim = class_dimension(student_logits, "student_logits")
    teacher = checks.check_floating("teacher", teacher)
    if teacher.shape != student_logits.shape:
        raise ValueError(
            f"teacher has shape {checks.shape_str(teacher.shape)} but student_logits has shape "
            f"{checks.shape_str(student_logits.shape)}; they must be equal"
        )
    if teacher.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "teacher requires grad, but distillation_loss trains the student only and would leave the teacher "
            "without a gradient; pass teacher.detach() or compute the teacher under torch.no_grad()"
        )
    dtype = accumulation_dtype(student_logits.dtype)
    teacher = teacher.to(dtype)
    if teacher_is_probs:
        checks.check_probabilities("teacher", teacher)
        _check_teacher_mass(teacher, class_dim)
        teacher = torch.log(teacher)  # log 0 = -inf: the class keeps probability 0 at any temperature
    log_q = torch.log_softmax(teacher / temperature, dim=class_dim)
    log_p = torch.log_softmax(student_logits.to(dtype) / temperature, dim=class_dim)
    q = log_q.exp()
    kl = (torch.xlogy(q, q) - q * log_p).sum(class_dim) * temperature**2
    if reduction == "batchmean":
        batch = student_logits.shape[0] if student_logits.dim() > 1 else 1
        total = kl.sum()
        return (total / batch if batch else total * 0).to(student_logits.dtype)
    return reduce_loss(kl, reduction).to(student_logits.dtype)


def _check_teacher_mass(teacher: torch.Tensor, class_dim: int) -> None:
    """Every teacher distribution has some probability mass: an all-zero row has no softened distribution (its
    normalisation is 0 / 0). Needs a host sync, so it obeys the value-check switch."""
    if not value_checks_enabled(teacher) or teacher.numel() == 0:
        return
    empty = teacher.sum(class_dim) <= 0
    if bool(empty.any()):
        position = tuple(int(i) for i in empty.nonzero()[0])
        raise ValueError(
            f"teacher holds probabilities (teacher_is_probs=True) but its distribution at {position} sums to 0; "
            "every distribution needs some probability mass"
        )


def linear_distillation_loss(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_linear_weight: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    teacher_linear_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    target: torch.Tensor | None = None,
    hard_weight: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    impl: Impl | None = None,
) -> torch.Tensor:
    r"""Distillation of a language model's head into another's, without either's ``N × V`` logits.

    .. math::
        \ell_n = T^2\, \mathrm{KL}\bigl(\operatorname{softmax}(z_{t,n} / T) \,\|\, \operatorname{softmax}(z_n / T)\bigr)
                 + \lambda \operatorname{CE}(z_n, y_n), \qquad z = x W^\top + b, \quad z_t = x_t W_t^\top + b_t

    Equal, in value and in the gradients of ``input``, ``linear_weight`` and ``linear_bias``, to
    ``distillation_loss(F.linear(input, W, b).reshape(-1, V), F.linear(teacher_input, W_t, b_t).reshape(-1, V),
    temperature=T, reduction=reduction)`` plus, with ``target``, ``hard_weight · cross_entropy(student logits,
    target)`` reduced alike (``"batchmean"``/``"mean"``: the mean over kept targets; ``"sum"``; ``"none"`` per token).
    Tokens are processed in chunks: each chunk's student and teacher logits, the teacher's softened probabilities,
    the loss and the student's gradient, then its share of the student's gradients
    (``xent.kernels.distill``). The teacher is not differentiated: teacher tensors that require grad raise.

    Args:
        input: the student's hidden states ``(..., D)``.
        linear_weight: the student's head ``(V, D)``.
        teacher_input: the teacher's hidden states ``(..., D_t)``, same batch shape.
        teacher_linear_weight: the teacher's head ``(V, D_t)``, same vocabulary.
        linear_bias, teacher_linear_bias: ``(V,)`` or ``None``.
        temperature: :math:`T > 0`.
        reduction: ``"batchmean"`` (the default: sum over tokens / N), ``"mean"`` (the same for flattened tokens),
            ``"sum"`` or ``"none"`` (the batch shape ``(...)``).
        target: class indices ``(...)`` for the hard-label term, or ``None`` for none.
        hard_weight: :math:`\lambda \ge 0`, the weight of the hard-label term.
        ignore_index: a target value excluded from the hard-label term.
        chunk_size: tokens per chunk, as in :func:`xent.linear_cross_entropy`.
        impl: ``None`` (the fused kernels: Triton on CUDA when installed, chunked PyTorch otherwise), ``"chunked"``,
            ``"triton"``, or ``"reference"`` (the formula above on the materialised logits).

    Example:
        >>> student, teacher = torch.randn(4, 64, 256, requires_grad=True), torch.randn(4, 64, 512)
        >>> W, W_t = torch.randn(32000, 256, requires_grad=True), torch.randn(32000, 512)
        >>> xent.linear_distillation_loss(student, W, teacher, W_t, temperature=2.0).backward()

    References:
        Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. NeurIPS Deep Learning Workshop 2015.
    """
    temperature = check_distillation_options(temperature=temperature, reduction=reduction)
    hard_weight = checks.check_in_range("hard_weight", hard_weight, 0.0)
    checks.check_chunk_size(chunk_size)
    for name, tensor in (("teacher_input", teacher_input), ("teacher_linear_weight", teacher_linear_weight),
                         ("teacher_linear_bias", teacher_linear_bias)):  # fmt: skip
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad, but linear_distillation_loss trains the student only and would leave the "
                f"teacher without a gradient; pass {name}.detach() or compute the teacher under torch.no_grad()"
            )
    out_dtype = result_dtype(checks.check_floating("input", input))
    input, linear_weight, linear_bias = (
        cast_for_linear(input),
        cast_for_linear(linear_weight),
        cast_for_linear(linear_bias),
    )
    teacher_input, teacher_linear_weight, teacher_linear_bias = (
        cast_for_linear(teacher_input),
        cast_for_linear(teacher_linear_weight),
        cast_for_linear(teacher_linear_bias),
    )
    teacher_input = checks.check_floating("teacher_input", teacher_input)
    if teacher_input.shape[:-1] != input.shape[:-1]:
        raise ValueError(
            f"teacher_input has shape {checks.shape_str(teacher_input.shape)} but input has shape "
            f"{checks.shape_str(input.shape)}; they must have the same batch shape (all but the last dimension)"
        )
    labels = target if target is not None else torch.zeros(input.shape[:-1], dtype=torch.long, device=input.device)
    flat_input, flat_target, batch_shape = canonicalize_linear(input, linear_weight, linear_bias, labels)
    teacher_names = ("teacher_input", "teacher_linear_weight", "teacher_linear_bias")
    flat_teacher, _, _ = canonicalize_linear(teacher_input, teacher_linear_weight, teacher_linear_bias, labels,
                                             teacher_names)  # fmt: skip
    if flat_target.is_floating_point():
        raise TypeError("target of linear_distillation_loss holds class indices, not probabilities")
    if teacher_linear_weight.shape[0] != linear_weight.shape[0]:
        raise ValueError(
            f"teacher_linear_weight has {teacher_linear_weight.shape[0]} classes but linear_weight has "
            f"{linear_weight.shape[0]}; student and teacher must share the vocabulary"
        )
    hard_options = RowLoss(ignore_index=ignore_index)
    if target is not None:
        checked_options(hard_options, None, flat_target, linear_weight.shape[0])
    num_tokens = flat_input.shape[0]
    with autocast_off(input):
        if impl == "reference":
            student = torch.nn.functional.linear(flat_input, linear_weight, linear_bias)
            with torch.no_grad():
                teacher = torch.nn.functional.linear(flat_teacher, teacher_linear_weight, teacher_linear_bias)
            loss = distillation_loss(student, teacher, temperature=temperature, reduction=reduction)
            if target is not None:
                hard_reduction = "mean" if reduction in ("batchmean", "mean") else reduction
                loss = loss + hard_weight * cross_entropy(
                    student, flat_target, ignore_index=ignore_index, reduction=hard_reduction, impl="reference"
                )
        else:
            kernel = dispatch.row_kernel(impl, flat_input.device)
            dtype = accumulation_dtype(flat_input.dtype)
            averaged = reduction in ("batchmean", "mean")
            # "batchmean"/"mean" run as a sum of per-token terms already divided by their own denominators.
            soft_factor = 1.0 / max(num_tokens, 1) if averaged else 1.0
            hard = None
            if target is not None:
                hard_factor: float | torch.Tensor = hard_weight
                if averaged:
                    hard_factor = safe_divide(
                        torch.tensor(hard_weight, dtype=dtype, device=flat_input.device),
                        mean_denominator(flat_target, hard_options, dtype),
                    )
                hard = (flat_target, hard_options, hard_factor)
            chunk_loss = distillation_chunk_loss(
                flat_teacher, teacher_linear_weight, teacher_linear_bias, temperature, soft_factor, kernel, hard
            )
            # three or four (c, V) buffers live at once (student, teacher, its probabilities, the hard term's copy)
            chunk_size = chunk_size or max(
                1, default_chunk_size(num_tokens, linear_weight.shape[0], flat_input.device, 4) // 4
            )
            loss = fused_linear_loss(
                flat_input,
                linear_weight,
                linear_bias,
                chunk_loss,
                "none" if reduction == "none" else "sum",
                chunk_size=chunk_size,
            )
    return (loss.view(batch_shape) if reduction == "none" else loss).to(out_dtype)
