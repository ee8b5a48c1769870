"""Knowledge distillation: match a teacher's softened distribution."""

from __future__ import annotations

import torch

from xent.core.autocast import float32_under_autocast
from xent.core.reduce import accumulation_dtype, reduce_loss
from xent.losses import _checks
from xent.losses.softmax import class_dimension

DISTILLATION_REDUCTIONS = ("none", "batchmean", "mean", "sum")


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
    temperature = _checks.check_in_range("temperature", temperature, 0.0, low_inclusive=False)
    _checks.check_reduction(reduction, DISTILLATION_REDUCTIONS)
    class_dim = class_dimension(student_logits)
    teacher = _checks.check_floating("teacher", teacher)
    if teacher.shape != student_logits.shape:
        raise ValueError(
            f"teacher has shape {_checks.shape_str(teacher.shape)} but student_logits has shape "
            f"{_checks.shape_str(student_logits.shape)}; they must be equal"
        )
    if teacher.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "teacher requires grad, but distillation_loss trains the student only and would leave the teacher "
            "without a gradient; pass teacher.detach() or compute the teacher under torch.no_grad()"
        )
    dtype = accumulation_dtype(student_logits.dtype)
    teacher = teacher.to(dtype)
    if teacher_is_probs:
        _checks.check_probabilities("teacher", teacher)
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
