r"""Distillation divergences on GPUs in Triton: the row kernels of the fused linear distillation (``impl="triton"``).

One program per row of a chunk of tokens; the student's logits ``z = s · cap(x)`` (softened: ``z / T``) are formed
from the head's raw outputs ``x`` block by block, never stored. :func:`dense_rows_` takes the teacher's raw head
outputs, :func:`top_k_rows_` a top-k teacher's categories. Data flow for row ``n``::

    dense   pass 1 over V: online log-sum-exp of the student's and the teacher's softened logits (and of the
                           student's u = s cap(x) at T = 1, for the hard labels)
            pass 2 over V: Σ terms (the divergence), Σ slopes, the student's entropy Σ -p log p   → loss[n], entropy[n]
            pass 3 over V: grad_scale[n] · s (1 - tanh²) (T (slope - p Σ slopes) + λ (softmax(u) - e_y)), over x

    top-k   load the row's k ids, gather the student's logits and the teacher's k + 1 categories
            pass 1 over V: online log-sum-exp (and entropy sums) of the classes outside the support: the tail
            the k + 1 categories in registers: loss, support gradient, tail coefficient    → loss[n], entropy[n]
            pass 2 over V: the tail's gradient T c e^{z/T - lse_tail} (+ the hard labels'); the support's scattered
                           after it

with the optional hard-label term ``λ CE(u, y)`` of :class:`xent.kernels.distill.HardLabels` added to the loss and
its gradient, as in the chunked kernels of :mod:`xent.kernels.distill`.

The math is :mod:`xent.core.divergence`'s (the same slopes, projection on the simplex, tail coefficient, log-mixture
and ``xlogy`` convention), term for term. Numerics designed in:

- every reduction and the gradient in float32 (float64 for float64 heads: ``ACC``), whatever the head's dtype; the
  scalar parameters (scale, cap, β, log β, ...) reach the kernel as a small tensor of that dtype, as a float64
  kernel argument would be rounded to float32;
- a category of probability exactly 0 (a ``-inf`` logit: a masked column, a padding entry) contributes 0 to every
  sum and gets a gradient of 0 (its ``0 · -inf`` never formed), and the online log-sum-exp survives blocks that are
  all ``-inf``;
- the tail's log-sum-exp is summed over the tail itself, never as ``lse - lse_support`` (which cancels when the
  support holds almost all the mass: the usual case): a block knows its support columns from the row's ids, sorted
  on the host (padding last), so that the ids falling in a block are a contiguous run of them — ``k`` compares per
  block plus one per id, rather than ``k`` per column;
- the hard label's ``p_y - 1`` from ``expm1(log p_y)``, not ``p_y - 1`` (no cancellation for a confident row);
- a row whose ``grad_scale`` is 0 (an ignored token) gets a gradient of exactly 0, whatever its teacher holds;
- row offsets in int64; no atomics, no host synchronisation (the scalar parameters are cached per configuration).

Only ``tl.*`` math is used, so the kernels run under ``TRITON_INTERPRET=1`` on a CPU.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, cast

import torch
import triton
import triton.language as tl

from xent.kernels.triton.row_loss import _tanh, block_size

if TYPE_CHECKING:
    from xent.kernels.distill import DistillSpec, HardLabels


DIVERGENCE_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _times_exp(log_x, y):
    # e^log_x · y, 0 where log_x = -inf (a probability of exactly 0, whatever y is: -inf, NaN)
    return tl.where(log_x == float("-inf"), 0.0, tl.exp(log_x) * y)


@triton.jit
def _logaddexp(u, v):
    top = tl.maximum(u, v)
    safe = tl.where(top == float("-inf"), 0.0, top)  # both -inf: -inf + log 0, not -inf - -inf
    return top + tl.log(tl.exp(u - safe) + tl.exp(v - safe))


@triton.jit
def _logsumexp(v):
    # over a 1-d block; -inf when every entry is
    top = tl.max(v, 0)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log(tl.sum(tl.exp(v - safe), 0))


@triton.jit
def _terms(a, b, beta, log1m_beta, log_beta, DIVERGENCE: tl.constexpr):
    # (term, slope ∂D/∂a) of each category — xent.core.divergence.divergence_terms
    if DIVERGENCE == 0:  # forward KL: q (b - a), -q
        term = _times_exp(b, b - a)
        slope = -_times_exp(b, 1.0 + 0.0 * a)
    elif DIVERGENCE == 1:  # reverse KL: p (a - b), p (a - b + 1)
        gap = a - b
        term = _times_exp(a, gap)
        slope = _times_exp(a, gap + 1.0)
    else:  # generalised JSD: β q (b - log m) + (1 - β) p (a - log m), (1 - β) p (a - log m)
        log_m = _logaddexp(a + log1m_beta, b + log_beta)
        student = (1.0 - beta) * _times_exp(a, a - log_m)
        term = beta * _times_exp(b, b - log_m) + student
        slope = student
    return term, slope


@triton.jit
def _capped(row_ptr, offs, mask, softcap, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    # (cap(x), tanh(x / c) or 0) of the columns offs of a row, cap(x) = -inf outside it: z / T = (s / T) cap(x)
    x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(ACC)
    tanh = tl.zeros_like(x)
    if HAS_SOFTCAP:
        tanh = _tanh(x / softcap)
        x = softcap * tanh
    return tl.where(mask, x, float("-inf")), tanh


@triton.jit
def _online_lse(top, total, z):
    # running (max, Σ e^{z - max}) updated with a block; blocks (and rows so far) of -inf leave it at (-inf, 0)
    new_top = tl.maximum(top, tl.max(z, 0))
    safe = tl.where(new_top == float("-inf"), 0.0, new_top)
    return new_top, total * tl.exp(top - safe) + tl.sum(tl.exp(z - safe), 0)


@triton.jit
def _parameter(params_ptr, index):
    # the scalars of _parameters, by position: 0 s/T, 1 cap, 2 s_t/T, 3 cap_t, 4 β, 5 log(1-β), 6 log β, 7 T², 8 T,
    # 9 s
    return tl.load(params_ptr + index)


@triton.jit
def _expm1(u):
    # e^u - 1 without cancellation for |u| < 0.1 (Taylor to u⁸: relative error 3e-14, for float64 too)
    small = u * (
        1.0 + u * (0.5 + u * (1 / 6 + u * (1 / 24 + u * (1 / 120 + u * (1 / 720 + u * (1 / 5040 + u / 40320))))))
    )
    return tl.where(tl.abs(u) < 0.1, small, tl.exp(u) - 1.0)


@triton.jit
def _hard_target(target_ptr, hard_weight_ptr, row, num_classes, ACC: tl.constexpr):
    # (y, λ) of a row; a target outside [0, V) (an ignored token's) is read as class 0 with weight 0
    target = tl.load(target_ptr + row).to(tl.int64)
    inside = (target >= 0) & (target < num_classes)
    weight = tl.where(inside, tl.load(hard_weight_ptr + row).to(ACC), 0.0)
    return tl.where(inside, target, 0), weight


@triton.jit
def _hard_gradient(log_p, at_target, hard_weight):
    # λ (softmax(u) - e_y), with p_y - 1 = expm1(log p_y) at the target (no cancellation when p_y ≈ 1)
    return hard_weight * tl.where(at_target, _expm1(log_p), tl.exp(log_p))


@triton.jit
def dense_rows_kernel(
    x_ptr,  # (c, V) the student's raw head outputs; overwritten with the gradient (HAS_GRAD)
    x_stride,
    t_ptr,  # (c, V) the teacher's raw head outputs, read only
    t_stride,
    params_ptr,  # (10,) ACC: see _parameter
    scale_ptr,  # (c,) per-row gradient scale
    loss_ptr,  # (c,) ACC, written: T² D (+ λ CE(u, y))
    entropy_ptr,  # (c,) written: -Σ p log p (HAS_ENTROPY)
    entropy_stride,
    target_ptr,  # (c,) int64 hard labels (HAS_HARD)
    hard_weight_ptr,  # (c,) their weights λ (HAS_HARD)
    num_classes,
    DIVERGENCE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TEACHER_SOFTCAP: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_HARD: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    t_row = t_ptr + row * t_stride
    cols = tl.arange(0, BLOCK)
    s_over_t = _parameter(params_ptr, 0)
    softcap = _parameter(params_ptr, 1)
    t_over_t = _parameter(params_ptr, 2)
    t_softcap = _parameter(params_ptr, 3)
    beta = _parameter(params_ptr, 4)
    log1m_beta = _parameter(params_ptr, 5)
    log_beta = _parameter(params_ptr, 6)
    logit_scale = _parameter(params_ptr, 9)

    # pass 1: both log-sum-exps at T (and the student's at 1 for the hard labels)
    top = tl.full((), float("-inf"), ACC)
    total = tl.zeros((), ACC)
    t_top = tl.full((), float("-inf"), ACC)
    t_total = tl.zeros((), ACC)
    u_top = tl.full((), float("-inf"), ACC)
    u_total = tl.zeros((), ACC)
    for start in range(0, num_classes, BLOCK):
        offs = start + cols
        mask = offs < num_classes
        capped, _ = _capped(x_row, offs, mask, softcap, HAS_SOFTCAP, ACC)
        top, total = _online_lse(top, total, capped * s_over_t)
        if HAS_HARD:
            u_top, u_total = _online_lse(u_top, u_total, capped * logit_scale)
        t_capped, _ = _capped(t_row, offs, mask, t_softcap, HAS_TEACHER_SOFTCAP, ACC)
        t_top, t_total = _online_lse(t_top, t_total, t_capped * t_over_t)
    lse = top + tl.log(total)
    t_lse = t_top + tl.log(t_total)
    u_lse = u_top + tl.log(u_total)

    # pass 2: the divergence, Σ slopes, the entropy
    divergence = tl.zeros((), ACC)
    slopes = tl.zeros((), ACC)
    entropy = tl.zeros((), ACC)
    for start in range(0, num_classes, BLOCK):
        offs = start + cols
        mask = offs < num_classes
        capped, _ = _capped(x_row, offs, mask, softcap, HAS_SOFTCAP, ACC)
        t_capped, _ = _capped(t_row, offs, mask, t_softcap, HAS_TEACHER_SOFTCAP, ACC)
        a = capped * s_over_t - lse
        term, slope = _terms(a, t_capped * t_over_t - t_lse, beta, log1m_beta, log_beta, DIVERGENCE)
        divergence += tl.sum(tl.where(mask, term, 0.0), 0)
        slopes += tl.sum(tl.where(mask, slope, 0.0), 0)
        if HAS_ENTROPY:
            entropy -= tl.sum(_times_exp(a, a), 0)
    loss = divergence * _parameter(params_ptr, 7)
    target = 0
    hard_weight = 0.0
    if HAS_HARD:
        target, hard_weight = _hard_target(target_ptr, hard_weight_ptr, row, num_classes, ACC)
        capped_target, _ = _capped(x_row, target, target >= 0, softcap, HAS_SOFTCAP, ACC)
        loss += tl.where(hard_weight == 0.0, 0.0, hard_weight * (u_lse - capped_target * logit_scale))
    tl.store(loss_ptr + row, loss)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row * entropy_stride, entropy.to(entropy_ptr.dtype.element_ty))

    # pass 3: scale · s (1 - tanh²) (T (slope - p Σ slopes) + λ (softmax(u) - e_y)), over x
    if HAS_GRAD:
        scale = tl.load(scale_ptr + row).to(ACC)
        temperature = _parameter(params_ptr, 8)
        for start in range(0, num_classes, BLOCK):
            offs = start + cols
            mask = offs < num_classes
            capped, tanh = _capped(x_row, offs, mask, softcap, HAS_SOFTCAP, ACC)
            t_capped, _ = _capped(t_row, offs, mask, t_softcap, HAS_TEACHER_SOFTCAP, ACC)
            a = capped * s_over_t - lse
            _, slope = _terms(a, t_capped * t_over_t - t_lse, beta, log1m_beta, log_beta, DIVERGENCE)
            grad = (slope - _times_exp(a, slopes)) * temperature
            if HAS_HARD:
                grad += _hard_gradient(capped * logit_scale - u_lse, offs == target, hard_weight)
            grad *= scale * logit_scale
            if HAS_SOFTCAP:
                grad *= 1.0 - tanh * tanh
            grad = tl.where(scale == 0.0, 0.0, grad)  # a dropped row (grad_scale 0) gets 0, even from inf or NaN
            tl.store(x_row + offs, grad.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _in_support(sorted_row, sorted_ids, offs, start, num_classes, BLOCK: tl.constexpr):
    # which columns of the block [start, start + BLOCK) are support ids: the ids are sorted (padding = V, last), so
    # the block's ones are the run sorted_row[first:last]. The end is bounded by V too: the last block may overhang
    # V, and the padding entries (V, and V again past k in the K_BLOCK-wide load) must not count — reading
    # sorted_row at them read past the row (the next row's ids, or past the tensor for the last row)
    first = tl.sum((sorted_ids < start).to(tl.int32), 0)
    last = tl.sum((sorted_ids < tl.minimum(start + BLOCK, num_classes)).to(tl.int32), 0)
    hit = offs < 0
    for position in range(first, last):
        hit = hit | (offs == tl.load(sorted_row + position))
    return hit


@triton.jit
def top_k_rows_kernel(
    x_ptr,  # (c, V) the student's raw head outputs; overwritten with the gradient (HAS_GRAD)
    x_stride,
    ids_ptr,  # (c, k) int64 class ids, read only where valid
    ids_stride,
    sorted_ptr,  # (c, k) int64 the valid ids sorted, padding entries replaced by V (last)
    sorted_stride,
    q_ptr,  # (c, k + 1) the teacher's categories (support, tail): log-probabilities
    q_stride,
    valid_ptr,  # (c, k) bool, False at padding entries
    valid_stride,
    params_ptr,  # (10,) ACC: see _parameter
    scale_ptr,  # (c,) per-row gradient scale
    loss_ptr,  # (c,) ACC, written: T² D (+ λ CE(u, y))
    entropy_ptr,  # (c,) written: -Σ p log p (HAS_ENTROPY)
    entropy_stride,
    target_ptr,  # (c,) int64 hard labels (HAS_HARD)
    hard_weight_ptr,  # (c,) their weights λ (HAS_HARD)
    num_classes,
    k,
    DIVERGENCE: tl.constexpr,
    SUPPORT_ONLY: tl.constexpr,  # renormalised reverse KL: KL(p̃ ‖ q̃) over the support
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_HARD: tl.constexpr,
    BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    sorted_row = sorted_ptr + row * sorted_stride
    cols = tl.arange(0, BLOCK)
    s_over_t = _parameter(params_ptr, 0)
    softcap = _parameter(params_ptr, 1)
    beta = _parameter(params_ptr, 4)
    log1m_beta = _parameter(params_ptr, 5)
    log_beta = _parameter(params_ptr, 6)
    logit_scale = _parameter(params_ptr, 9)

    # the support: ids (one outside [0, V) is padding: never read), the student's logits there, the teacher's
    entries = tl.arange(0, K_BLOCK)
    in_k = entries < k
    valid = tl.load(valid_ptr + row * valid_stride + entries, mask=in_k, other=0) != 0
    ids = tl.load(ids_ptr + row * ids_stride + entries, mask=valid, other=0)
    valid = valid & (ids >= 0) & (ids < num_classes)
    ids = tl.where(valid, ids, 0)
    sorted_ids = tl.load(sorted_row + entries, mask=in_k, other=num_classes)
    capped_support, tanh_support = _capped(x_row, ids, valid, softcap, HAS_SOFTCAP, ACC)
    z_support = capped_support * s_over_t  # -inf at padding
    q_row = q_ptr + row * q_stride
    b_support = tl.where(valid, tl.load(q_row + entries, mask=valid, other=0.0).to(ACC), float("-inf"))
    b_tail = tl.load(q_row + k).to(ACC)

    # pass 1: log-sum-exp of the tail, Σ e^{z - max} (z - max) over it for the entropy, the hard labels' lse
    top = tl.full((), float("-inf"), ACC)
    total = tl.zeros((), ACC)
    moment = tl.zeros((), ACC)
    u_top = tl.full((), float("-inf"), ACC)
    u_total = tl.zeros((), ACC)
    for start in range(0, num_classes, BLOCK):
        offs = start + cols
        mask = offs < num_classes
        capped, _ = _capped(x_row, offs, mask, softcap, HAS_SOFTCAP, ACC)
        if HAS_HARD:
            u_top, u_total = _online_lse(u_top, u_total, capped * logit_scale)
        z = tl.where(
            _in_support(sorted_row, sorted_ids, offs, start, num_classes, BLOCK), float("-inf"), capped * s_over_t
        )
        if HAS_ENTROPY:
            new_top = tl.maximum(top, tl.max(z, 0))
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            # Σ e^{z - m'} (z - m') = r (Σ e^{z - m} (z - m) + (m - m') Σ e^{z - m}), r = e^{m - m'}: 0 while m = -inf
            moment = tl.where(top == float("-inf"), 0.0, tl.exp(top - safe) * (moment + (top - safe) * total))
            moment += tl.sum(_times_exp(z - safe, z - safe), 0)
        top, total = _online_lse(top, total, z)
    lse_tail = top + tl.log(total)
    lse = _logaddexp(lse_tail, _logsumexp(z_support))
    u_lse = u_top + tl.log(u_total)
    a_support = z_support - lse
    a_tail = lse_tail - lse
    b_tail = tl.where(a_tail == float("-inf"), float("-inf"), b_tail)  # a support covering V leaves no tail

    # the k + 1 categories — xent.core.divergence.top_k_rows
    if SUPPORT_ONLY:
        conditional = z_support - _logsumexp(z_support)
        divergence = tl.sum(_times_exp(conditional, conditional - b_support), 0)
        support_gradient = _times_exp(conditional, conditional - b_support - divergence)
        tail_coefficient = tl.zeros((), ACC)
    else:
        terms, slopes = _terms(a_support, b_support, beta, log1m_beta, log_beta, DIVERGENCE)
        tail_term, tail_slope = _terms(a_tail, b_tail, beta, log1m_beta, log_beta, DIVERGENCE)
        divergence = tl.sum(terms, 0) + tail_term
        slope_sum = tl.sum(slopes, 0) + tail_slope
        support_gradient = slopes - _times_exp(a_support, slope_sum)
        tail_coefficient = tail_slope - _times_exp(a_tail, slope_sum)
    loss = divergence * _parameter(params_ptr, 7)
    target = 0
    hard_weight = 0.0
    if HAS_HARD:
        target, hard_weight = _hard_target(target_ptr, hard_weight_ptr, row, num_classes, ACC)
        capped_target, _ = _capped(x_row, target, target >= 0, softcap, HAS_SOFTCAP, ACC)
        loss += tl.where(hard_weight == 0.0, 0.0, hard_weight * (u_lse - capped_target * logit_scale))
    tl.store(loss_ptr + row, loss)
    if HAS_ENTROPY:
        # -Σ_S p log p - P_tail log P_tail + P_tail H(tail), H(tail) = log Σ - moment / Σ over the tail
        entropy = -tl.sum(_times_exp(a_support, a_support), 0) - _times_exp(a_tail, a_tail)
        tail_entropy = tl.log(total) - moment / total
        entropy += tl.where(total > 0.0, _times_exp(a_tail, tail_entropy), 0.0)
        tl.store(entropy_ptr + row * entropy_stride, entropy.to(entropy_ptr.dtype.element_ty))

    # pass 2: scale · s (1 - tanh²) (T ∂D/∂z + λ (softmax(u) - e_y)); ∂D/∂z = c e^{z - lse_tail} off the support
    if HAS_GRAD:
        scale = tl.load(scale_ptr + row).to(ACC)
        temperature = _parameter(params_ptr, 8)
        for start in range(0, num_classes, BLOCK):
            offs = start + cols
            mask = offs < num_classes
            capped, tanh = _capped(x_row, offs, mask, softcap, HAS_SOFTCAP, ACC)
            z = capped * s_over_t
            grad = temperature * tl.where(z == float("-inf"), 0.0, tail_coefficient * tl.exp(z - lse_tail))
            if HAS_HARD:
                grad += _hard_gradient(capped * logit_scale - u_lse, offs == target, hard_weight)
            grad *= scale * logit_scale
            if HAS_SOFTCAP:
                grad *= 1.0 - tanh * tanh
            grad = tl.where(scale == 0.0, 0.0, grad)  # a dropped row (grad_scale 0) gets 0, even from inf or NaN
            # the support's columns are left to the scatter below (their values were read before this pass): no
            # address is written twice, so the warps need no barrier
            support = _in_support(sorted_row, sorted_ids, offs, start, num_classes, BLOCK)
            tl.store(x_row + offs, grad.to(x_ptr.dtype.element_ty), mask=mask & ~support)
        grad = temperature * support_gradient
        if HAS_HARD:
            grad += _hard_gradient(capped_support * logit_scale - u_lse, ids == target, hard_weight)
        grad *= scale * logit_scale
        if HAS_SOFTCAP:
            grad *= 1.0 - tanh_support * tanh_support
        grad = tl.where(scale == 0.0, 0.0, grad)
        tl.store(x_row + ids, grad.to(x_ptr.dtype.element_ty), mask=valid)


@functools.lru_cache(maxsize=64)
def _parameters(
    temperature: float,
    logit_scale: float,
    softcap: float | None,
    teacher_logit_scale: float,
    teacher_softcap: float | None,
    beta: float,
    jsd: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The kernels' scalars, formed in float64 on the host and stored once per configuration in the accumulation
    dtype (a float kernel argument would be float32): s / T, cap, s_t / T, cap_t, β, log(1 - β), log β, T², T, s."""
    values = [
        logit_scale / temperature,
        softcap or 1.0,
        teacher_logit_scale / temperature,
        teacher_softcap or 1.0,
        beta if jsd else 0.5,
        math.log1p(-beta) if jsd else 0.0,
        math.log(beta) if jsd else 0.0,
        temperature**2,
        temperature,
        logit_scale,
    ]
    return torch.tensor(values, dtype=dtype, device=device)


def _launch_arguments(
    student: torch.Tensor,
    spec: DistillSpec,
    grad_scale: torch.Tensor,
    entropy: torch.Tensor | None,
    hard: HardLabels | None,
) -> tuple[list[Any], dict[str, Any], torch.Tensor]:
    """The arguments the two kernels share, ``(params, scale, loss, entropy, entropy stride, target, weight)`` and
    their constexprs, and the losses they write."""
    if spec.divergence not in DIVERGENCE_IDS:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCE_IDS)}, got {spec.divergence!r}")
    if student.dim() != 2 or student.stride(1) != 1:
        raise ValueError("the Triton distillation kernels need (c, V) rows with unit column stride")
    accumulate = torch.float64 if student.dtype == torch.float64 else torch.float32
    params = _parameters(
        float(spec.temperature),
        float(spec.logit_scale),
        None if spec.softcap is None else float(spec.softcap),
        float(spec.teacher_logit_scale),
        None if spec.teacher_softcap is None else float(spec.teacher_softcap),
        float(spec.beta),
        spec.divergence == "jsd",
        accumulate,
        student.device,
    )
    losses = torch.empty(student.shape[0], dtype=accumulate, device=student.device)
    scale = grad_scale.to(device=student.device).reshape(-1).expand(student.shape[0]).contiguous()
    target = weight = losses
    if hard is not None:
        target, weight = hard.target.contiguous(), hard.weight.to(device=student.device).contiguous()
    arguments = [
        params,
        scale,
        losses,
        entropy if entropy is not None else losses,
        entropy.stride(0) if entropy is not None else 0,
        target,
        weight,
    ]
    constexprs = {
        "DIVERGENCE": DIVERGENCE_IDS[spec.divergence],
        "HAS_SOFTCAP": spec.softcap is not None,
        "HAS_ENTROPY": entropy is not None,
        "HAS_HARD": hard is not None,
        "BLOCK": block_size(student.shape[1]),
        "ACC": tl.float64 if accumulate == torch.float64 else tl.float32,
    }
    return arguments, constexprs, losses


def dense_rows_(
    student: torch.Tensor,
    teacher: torch.Tensor,
    spec: DistillSpec,
    grad_scale: torch.Tensor,
    needs_grad: bool,
    entropy: torch.Tensor | None,
    hard: HardLabels | None = None,
) -> torch.Tensor:
    r"""``T² D(q, p)`` of each row (float32; float64 for a float64 head), with :math:`p = \operatorname{softmax}(z
    / T)` of the student's logits :math:`z = s \operatorname{cap}(x)` and :math:`q` the teacher's, likewise; plus
    ``λ CE(z, y)`` (at T = 1) with hard labels — the contract of :func:`xent.kernels.distill.dense_rows_`.

    Args:
        student: ``(c, V)`` the student's raw head outputs ``x``; when ``needs_grad``, overwritten with
            ``grad_scale[n] · ∂(T² D + λ CE)/∂x`` in its dtype.
        teacher: ``(c, V)`` the teacher's raw head outputs, read only.
        spec: the divergence, β, T and both heads' logit scale and softcap.
        grad_scale: ``(c,)`` the gradient's factor of each row (a row whose factor is 0 gets a gradient of 0).
        needs_grad: whether to write the gradient.
        entropy: ``(c,)`` written with the student's entropy :math:`-\sum p \log p` at temperature T, or None.
        hard: the hard labels ``target (c,)`` and weights ``λ (c,)``, or None.
    """
    if teacher.shape != student.shape or teacher.stride(1) != 1:
        raise ValueError(f"the teacher's rows must match the student's {tuple(student.shape)} with unit column stride")
    arguments, constexprs, losses = _launch_arguments(student, spec, grad_scale, entropy, hard)
    num_rows, num_classes = student.shape
    if num_rows:
        dense_rows_kernel[(num_rows,)](
            student,
            student.stride(0),
            teacher,
            teacher.stride(0),
            *arguments,
            num_classes,
            HAS_TEACHER_SOFTCAP=spec.teacher_softcap is not None,
            HAS_GRAD=needs_grad,
            **constexprs,
        )
    return losses


def top_k_rows_(
    student: torch.Tensor,
    indices: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    spec: DistillSpec,
    grad_scale: torch.Tensor,
    needs_grad: bool,
    entropy: torch.Tensor | None,
    hard: HardLabels | None = None,
) -> torch.Tensor:
    r"""``T² D(q, p)`` of each row from a top-k teacher (float32; float64 for a float64 head), as
    :func:`xent.core.divergence.top_k_rows` with the student :math:`p = \operatorname{softmax}(z / T)` over the
    whole vocabulary, :math:`z = s \operatorname{cap}(x)`; plus ``λ CE(z, y)`` (at T = 1) with hard labels — the
    contract of :func:`xent.kernels.distill.top_k_rows_`.

    Args:
        student: ``(c, V)`` the student's raw head outputs ``x``; when ``needs_grad``, overwritten with
            ``grad_scale[n] · ∂(T² D + λ CE)/∂x`` in its dtype.
        indices: ``(c, k)`` int64 the support's class ids, distinct within a row (not read at padding; an id
            outside ``[0, V)`` counts as padding).
        teacher: ``(c, k + 1)`` the teacher's categories (support then tail) from
            :func:`xent.core.divergence.teacher_categories`.
        valid: ``(c, k)`` bool, False at padding entries.
        spec: the divergence, β, T, the tail and the student's logit scale and softcap.
        grad_scale: ``(c,)`` the gradient's factor of each row (a row whose factor is 0 gets a gradient of 0).
        needs_grad: whether to write the gradient.
        entropy: ``(c,)`` written with the student's entropy :math:`-\sum p \log p` at temperature T, or None.
        hard: the hard labels ``target (c,)`` and weights ``λ (c,)``, or None.
    """
    num_rows, num_classes = student.shape
    k = indices.shape[1]
    if indices.shape != (num_rows, k) or valid.shape != (num_rows, k) or teacher.shape != (num_rows, k + 1):
        raise ValueError(
            f"top-k rows need indices and valid (c, k) and teacher (c, k + 1), got {tuple(indices.shape)}, "
            f"{tuple(valid.shape)} and {tuple(teacher.shape)}"
        )
    arguments, constexprs, losses = _launch_arguments(student, spec, grad_scale, entropy, hard)
    if num_rows:
        indices, valid, teacher = indices.contiguous(), valid.contiguous(), teacher.contiguous()
        # the valid ids in increasing order, padding (V) last: the ids of a block of columns are then one run
        sorted_ids = torch.where(valid, indices, num_classes).sort(dim=1).values
        top_k_rows_kernel[(num_rows,)](
            student,
            student.stride(0),
            indices,
            indices.stride(0),
            sorted_ids,
            sorted_ids.stride(0),
            teacher,
            teacher.stride(0),
            valid,
            valid.stride(0),
            *arguments,
            num_classes,
            k,
            SUPPORT_ONLY=spec.tail == "renormalize" and spec.divergence == "reverse_kl",
            HAS_GRAD=needs_grad,
            K_BLOCK=max(1, cast(int, triton.next_power_of_2(k))),
            **constexprs,
        )
    return losses
