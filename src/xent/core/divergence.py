r"""Divergences between a student's and a teacher's distributions, and their gradients — the math every
distillation implementation shares.

With :math:`a = \log p` the student's log-probabilities and :math:`b = \log q` the teacher's, over the same
categories (the vocabulary, or a top-k teacher's support and its tail):

.. math::
    \mathrm{forward\_kl} &= \mathrm{KL}(q \,\|\, p) = \textstyle\sum_c q_c (b_c - a_c), \\
    \mathrm{reverse\_kl} &= \mathrm{KL}(p \,\|\, q) = \textstyle\sum_c p_c (a_c - b_c), \\
    \mathrm{jsd}_\beta &= \beta\, \mathrm{KL}(q \,\|\, m) + (1 - \beta)\, \mathrm{KL}(p \,\|\, m), \qquad
    m = \beta q + (1 - \beta) p,

the last being the generalized Jensen–Shannon divergence of TRL's ``generalized_jsd_loss`` and Liger-Kernel's
``LigerFusedLinearJSD`` for :math:`0 < \beta < 1`. Those libraries special-case :math:`\beta = 0` and
:math:`\beta = 1` as the forward and reverse KL, but the formula itself tends to 0 at both ends (:math:`m \to p`
or :math:`m \to q`), so here the endpoints are divergences of their own and ``jsd`` takes :math:`\beta` in
:math:`(0, 1)` only.

:func:`divergence_terms` gives each category's term and the slope :math:`\partial D / \partial a_c` with the
:math:`a_c` taken as free variables:

.. math::
    \frac{\partial\, \mathrm{forward\_kl}}{\partial a_c} = -q_c, \qquad
    \frac{\partial\, \mathrm{reverse\_kl}}{\partial a_c} = p_c (a_c - b_c + 1), \qquad
    \frac{\partial\, \mathrm{jsd}_\beta}{\partial a_c} = (1 - \beta)\, p_c (a_c - \log m_c).

When the student's categories are the softmax of logits :math:`z` (over the vocabulary), the gradient with respect
to :math:`z` is the slope projected on the simplex, :math:`\partial D / \partial z_j = s_j - p_j \sum_c s_c`
(:func:`softmax_gradient`); a category that gathers several classes (a top-k teacher's tail) passes
:math:`s_c\, p_j / P_c` to each of its classes :math:`j` (:func:`top_k_rows`). Terms whose probability is exactly 0
contribute 0 (the ``xlogy`` convention), and so do their slopes.

A **top-k teacher** gives, per token, the ids :math:`S` of its k most likely classes and their log-probabilities
:math:`\ell`; the rest of its distribution is unknown. Two treatments (:data:`TOP_K_TAILS`):

- ``"renormalize"``: the teacher is :math:`\tilde q = \operatorname{softmax}(\ell)` on :math:`S` and 0 elsewhere.
  Forward KL and JSD are then exact over the whole vocabulary (the student's mass outside :math:`S`, one category
  :math:`P_{\bar S}`, enters JSD through :math:`m = (1 - \beta) p` there). Reverse KL would be infinite as soon as
  the student puts mass outside :math:`S`, so it is taken over the support: :math:`\mathrm{KL}(\tilde p \,\|\,
  \tilde q)` with :math:`\tilde p` the student renormalised on :math:`S` (its mass outside :math:`S` is then left
  alone);
- ``"bucket"``: both distributions over the :math:`k + 1` categories :math:`S \cup \{\text{tail}\}`, the teacher's
  tail being :math:`1 - \sum_S e^{\ell}` (0 when within the rounding of that sum, :math:`k` times the dtype's
  epsilon; after softening, floored at the dtype's smallest normal number, which keeps the reverse KL finite when the
  teacher's top-k holds all its mass) and the student's :math:`P_{\bar S} = \sum_{j \notin S} p_j`. Every
  divergence is exact over those categories. When the support covers the whole vocabulary there is no tail.

Entries of :math:`S` whose log-probability is :math:`-\infty` are padding (a teacher that returned fewer than k
classes): they are not part of the support, and their ids are not read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TOP_K_TAILS = ("renormalize", "bucket")


def _times_exp(log_x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``e^log_x · y``, 0 where ``log_x = -inf`` (a probability of exactly 0, whatever ``y`` is)."""
    return torch.where(log_x == -math.inf, torch.zeros_like(y), log_x.exp() * y)


def log_mixture(a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
    r""":math:`\log m = \log(\beta e^b + (1 - \beta) e^a)`, elementwise."""
    return torch.logaddexp(a + math.log1p(-beta), b + math.log(beta))


def divergence_terms(
    a: torch.Tensor, b: torch.Tensor, divergence: str, beta: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(terms, slopes)``, each shaped like ``a``: the divergence's term of each category (their sum over the
    categories is the divergence) and :math:`\partial D / \partial a_c` (see the module docstring).

    Args:
        a: the student's log-probabilities; b: the teacher's, same shape (either may hold ``-inf``).
        divergence: one of :data:`DIVERGENCES`.
        beta: :math:`\beta \in (0, 1)` of ``"jsd"``.
    """
    if divergence == "forward_kl":
        return _times_exp(b, b - a), -_times_exp(b, torch.ones_like(b))
    if divergence == "reverse_kl":
        gap = a - b
        return _times_exp(a, gap), _times_exp(a, gap + 1.0)
    if divergence == "jsd":
        log_m = log_mixture(a, b, beta)
        student = _times_exp(a, a - log_m)
        return beta * _times_exp(b, b - log_m) + (1.0 - beta) * student, (1.0 - beta) * student
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def softmax_gradient(slopes: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    r""":math:`\partial D / \partial z = s - p \sum_c s_c` for a student :math:`p = \operatorname{softmax}(z)` over
    the last dimension, from the slopes ``s`` of :func:`divergence_terms`."""
    return slopes - log_p.exp() * slopes.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class TopKRows:
    r"""What a block of rows of a top-k teacher gives the student, ``(B,)`` or ``(B, k)`` each:

    ``loss``: the divergence; ``support_gradient``: :math:`\partial D / \partial z_i` at each support entry (0 at
    padding); ``tail_coefficient``: :math:`c` such that :math:`\partial D / \partial z_j = c\, e^{z_j -
    \operatorname{lse}_{\bar S}} = c\, p_j / P_{\bar S}` for every class :math:`j` outside the support — a factor of
    the student's distribution within the tail, which neither overflows nor underflows when the tail's mass is
    tiny."""

    loss: torch.Tensor
    support_gradient: torch.Tensor
    tail_coefficient: torch.Tensor


def teacher_categories(
    teacher_log_probs: torch.Tensor, valid: torch.Tensor, tail: str, temperature: float = 1.0
) -> torch.Tensor:
    r"""The teacher's log-probabilities over the support and the tail, ``(B, k + 1)``: renormalised on the support
    (tail :math:`-\infty`) or with its remaining mass as the tail, then softened as :math:`q \propto q^{1/T}` over
    those categories. Padding entries (``valid`` False) get :math:`-\infty`."""
    log_q = teacher_log_probs.masked_fill(~valid, -math.inf)
    if tail == "renormalize":
        categories = torch.cat([log_q, torch.full_like(log_q[:, :1], -math.inf)], dim=1)
    else:
        remainder = -torch.expm1(torch.logsumexp(log_q, dim=1).clamp(max=0.0))
        # a remainder within the rounding of the top-k's sum is no mass (softened, it would grow as r^(1/T))
        rounding = log_q.shape[1] * torch.finfo(log_q.dtype).eps
        remainder = torch.where(remainder > rounding, remainder, torch.zeros_like(remainder))
        categories = torch.cat([log_q, remainder.log().unsqueeze(1)], dim=1)
    if temperature != 1.0:
        categories = categories / temperature
    categories = torch.log_softmax(categories, dim=1)
    if tail == "bucket":  # floored after softening, so that the reverse KL stays finite
        categories[:, -1].clamp_(min=math.log(torch.finfo(categories.dtype).tiny))
    return categories


def top_k_rows(
    student_support: torch.Tensor,
    lse: torch.Tensor,
    lse_tail: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    divergence: str,
    beta: float,
    tail: str,
    *,
    differentiable: bool = False,
) -> TopKRows:
    r"""The divergence of a block of rows from a top-k teacher, and its gradient's parts (:class:`TopKRows`).

    Args:
        student_support: the student's (scaled) logits at the support ``(B, k)``, any value at padding.
        lse: :math:`\log \sum_j e^{z_j}` over the whole vocabulary ``(B,)``.
        lse_tail: the same over the classes outside the support ``(B,)`` (:math:`-\infty` when there are none).
        teacher: the teacher's categories ``(B, k + 1)`` from :func:`teacher_categories`.
        valid: ``(B, k)``, False at padding entries.
        divergence, beta: as :func:`divergence_terms`.
        tail: one of :data:`TOP_K_TAILS`.
        differentiable: for autograd through ``loss`` (the reference): log-probabilities of exactly 0 are clamped
            at the dtype's lowest number, so that no ``0 · inf`` reaches a gradient.
    """
    log_support = (student_support - lse.unsqueeze(1)).masked_fill(~valid, -math.inf)
    log_tail = lse_tail - lse
    # a support that covers the vocabulary leaves no tail: the teacher's (floored) tail has no classes either
    teacher = torch.cat(
        [teacher[:, :-1], teacher[:, -1:].masked_fill(log_tail.unsqueeze(1) == -math.inf, -math.inf)], 1
    )
    if differentiable:
        lowest = torch.finfo(log_support.dtype).min
        log_support, log_tail, teacher = (
            log_support.clamp(min=lowest),
            log_tail.clamp(min=lowest),
            teacher.clamp(min=lowest),
        )
    if tail == "renormalize" and divergence == "reverse_kl":
        # KL(p̃ ‖ q̃) with p̃ the student renormalised on the support: the slope with respect to log p_i of the
        # support is p̃_i (log p̃_i − log q̃_i − KL), and nothing reaches the classes outside it.
        conditional = log_support - torch.logsumexp(log_support, dim=1, keepdim=True)
        terms, _ = divergence_terms(conditional, teacher[:, :-1], divergence)
        loss = terms.sum(dim=1)
        slopes = _times_exp(conditional, conditional - teacher[:, :-1] - loss.unsqueeze(1))
        return TopKRows(loss, slopes, torch.zeros_like(loss))
    student = torch.cat([log_support, log_tail.unsqueeze(1)], dim=1)
    terms, slopes = divergence_terms(student, teacher, divergence, beta)
    total = slopes.sum(dim=1)
    # a support class is its own category: s_i − p_i Σ s; a class j of the tail gets s_tail p_j / P_tail − p_j Σ s
    # = (p_j / P_tail)(s_tail − P_tail Σ s)
    support_gradient = slopes[:, :-1] - _times_exp(log_support, total.unsqueeze(1))
    tail_coefficient = slopes[:, -1] - _times_exp(log_tail, total)
    return TopKRows(terms.sum(dim=1), support_gradient, tail_coefficient)
