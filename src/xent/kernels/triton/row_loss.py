"""Cross-entropy on GPUs in Triton: one program per row, the loss and the gradient in one launch.

Data flow of :func:`row_loss_kernel` for row ``n`` of logits ``(M, C)``::

    pass 1 over V in blocks: online log-sum-exp (running max m, running Σ exp(x - m)), and the row sums the loss
                             needs (Σ w_c x_c for smoothing; Σ w_c t'_c x_c and Σ w_c t'_c for probabilities)
    row statistics:          lse, loss, and the softmax coefficient a of the gradient  → loss[n]
    pass 2 over V in blocks: grad = scale[n] · (exp(x - lse) · a - b), written in the output dtype

so the logits are read twice and the gradient written once — the floor for this operation. The gradient may be
written over the logits (``inplace_backward``). Numerics designed in, each with a test under the interpreter:

- offsets are int64 (``row * stride`` overflows int32 beyond 2³¹ elements: 16k tokens × 128k vocabulary);
- the target's gradient ``p_y - 1`` is formed in float32 as ``expm1(log p_y)`` with ``log p_y = (x - max) - log Σ``
  (Σ summed with Kahan compensation) and stored once — never from a rounded bfloat16 probability, nor as
  ``exp(x - lse) - 1`` whose ``lse`` rounds to the max: catastrophic cancellation when ``p_y`` is close to 1;
- no host synchronisation: every per-row quantity stays on the device; no atomics, so results are deterministic.

Only ``tl.*`` math is used (tanh through ``exp``), so the same kernel runs under ``TRITON_INTERPRET=1`` on a CPU.
"""

from __future__ import annotations

from typing import cast, overload

import torch
import triton
import triton.language as tl

from xent.core.reduce import accumulation_dtype
from xent.core.rowloss import FocalTerm, GeneralizedTerm, Poly1Term, RowLoss, SymmetricTerm, TargetTerm

MAX_BLOCK = 4096  # columns per block on a GPU; the interpreter uses small blocks (see block_size)


@triton.jit
def _tanh(u):
    # 1 - 2 / (e^{2u} + 1): exact limits ±1 for |u| → ∞ (e^{2u} → ∞ gives 1, → 0 gives -1), only tl.exp needed
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _kahan_add(total, compensation, value):
    # compensated summation: `compensation` keeps the low-order bits that adding `value` to `total` rounds away
    addend = value - compensation
    new_total = total + addend
    return new_total, (new_total - total) - addend


@triton.jit
def _expm1(u):
    # e^u - 1 without cancellation for small |u| (a cubic Taylor polynomial, error u⁴/24), exp otherwise
    small = u * (1.0 + u * (0.5 + u * (1.0 / 6.0)))
    return tl.where(tl.abs(u) < 1e-2, small, tl.exp(u) - 1.0)


@triton.jit
def _transformed(x_row, offset_ptr, offs, mask, target, softcap, margin, logit_scale, HAS_SOFTCAP: tl.constexpr,
                 HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr):  # fmt: skip
    # z = s (cap(x) + o - m_y e_y) of the columns `offs` of a row, in float32
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    if HAS_OFFSET:
        x += tl.load(offset_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MARGIN:
        x -= tl.where(offs == target, margin, 0.0)
    return x * logit_scale


@triton.jit
def _block_weights(weight_ptr, t_row, offs, mask, smoothing, num_classes, HAS_WEIGHT: tl.constexpr,
                   PROBS: tl.constexpr):  # fmt: skip
    # w_c for class indices; w_c · t'_c, the smoothed target, for probabilities; 0 outside the row
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    if PROBS:
        t = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        w = w * tl.where(mask, t * (1.0 - smoothing) + smoothing / num_classes, 0.0)
    return w


# The target terms ψ(u) of xent.core.rowloss, by constexpr id (the kernel is specialised per term at compile time).
TERMS = {"cross_entropy": 0, "focal": 1, "poly1": 2, "generalized": 3, "symmetric": 4}


def term_parameters(term: TargetTerm) -> tuple[int, float, float, float]:
    """The kernel's (TERM id, p0, p1, p2) for a :class:`xent.core.rowloss.TargetTerm`."""
    parameters = {  # term.name tells which subclass term is
        "focal": lambda: (cast(FocalTerm, term).gamma, 0.0, 0.0),
        "poly1": lambda: (cast(Poly1Term, term).epsilon, 0.0, 0.0),
        "generalized": lambda: (cast(GeneralizedTerm, term).q, 0.0, 0.0),
        "symmetric": lambda: (
            cast(SymmetricTerm, term).alpha,
            cast(SymmetricTerm, term).beta,
            cast(SymmetricTerm, term).log_zero,
        ),
    }.get(term.name, lambda: (0.0, 0.0, 0.0))()
    return (TERMS[term.name], *parameters)


@triton.jit
def _target_term(u, smoothing, num_classes, p0, p1, p2, TERM: tl.constexpr):
    # (ψ(u), ψ'(u)) of u = log p_y ≤ 0 — the @triton.jit twin of each xent.core.rowloss.TargetTerm
    p = tl.exp(u)
    if TERM == 0:  # cross-entropy: -(1 - ε) u
        value = -(1.0 - smoothing) * u
        derivative = -(1.0 - smoothing) + 0.0 * u
    elif TERM == 1:  # focal, γ = p0: -(1 - p)^γ u
        one_minus_p = tl.maximum(-_expm1(u), 1.1754943508222875e-38)
        log_one_minus_p = tl.log(one_minus_p)
        factor = tl.exp(p0 * log_one_minus_p)
        value = -factor * u
        derivative = -factor + p0 * u * tl.exp(u + (p0 - 1.0) * log_one_minus_p)
    elif TERM == 2:  # poly-1, ε = p0: -(1 - s) u + ε (1 - (1 - s) p - s / C)
        value = -(1.0 - smoothing) * u + p0 * (1.0 - (1.0 - smoothing) * p - smoothing / num_classes)
        derivative = -(1.0 - smoothing) * (1.0 + p0 * p)
    elif TERM == 3:  # generalized, q = p0: (1 - p^q) / q
        value = -_expm1(p0 * u) / p0
        derivative = -tl.exp(p0 * u)
    else:  # symmetric, α = p0, β = p1, A = p2: -α u - β A (1 - p)
        value = -p0 * u + p1 * p2 * _expm1(u)
        derivative = -p0 + p1 * p2 * p
    return value, derivative


@triton.jit
def row_loss_kernel(
    logits_ptr,  # (M, C) read only, any float dtype — unless it is grad_ptr
    logits_stride,  # elements between rows
    grad_ptr,  # (M, C) overwritten with scale · ∂loss/∂logits (may alias logits_ptr); unused without HAS_GRAD
    grad_stride,
    target_ptr,  # (M,) int64 class indices, or (M, C) probabilities (PROBS)
    target_stride,  # elements between rows of probabilities
    weight_ptr,  # (C,) float32 class weights, read only (HAS_WEIGHT)
    scale_ptr,  # (M,) float32 per-row gradient scale, read only
    loss_ptr,  # (M,) float32, written
    offset_ptr,  # (C,) float32 per-class logit offset o, read only (HAS_OFFSET)
    alpha_ptr,  # (M,) float32 α_y of each row, read only (HAS_ALPHA)
    margin_ptr,  # (M,) float32 margin m_y of each row, read only (HAS_MARGIN)
    num_classes,
    ignore_index,
    smoothing,
    z_loss,
    softcap,
    logit_scale,  # s of z = s (cap(x) + o - m_y e_y)
    p0,  # the target term's parameters (see _target_term)
    p1,
    p2,
    PROBS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_MARGIN: tl.constexpr,
    TERM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    t_row = target_ptr + row * target_stride
    cols = tl.arange(0, BLOCK)
    if PROBS:
        target = 0
        margin = 0.0
    else:
        target = tl.load(target_ptr + row).to(tl.int64)
        valid = target != ignore_index
        target = tl.where(valid, target, 0)
        margin = 0.0
        if HAS_MARGIN:
            margin = tl.load(margin_ptr + row).to(tl.float32)

    # pass 1: online log-sum-exp and the row sums
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    compensation = tl.zeros((), tl.float32)  # Kahan: what adding each block's small Σ to a large s rounded away
    weighted_sum = tl.zeros((), tl.float32)  # Σ w_c x_c (indices) or Σ w_c t'_c x_c (probabilities)
    total_weight = tl.zeros((), tl.float32)  # Σ w_c (indices) or Σ w_c t'_c (probabilities)
    for start in range(0, num_classes, BLOCK):
        offs = start + cols
        mask = offs < num_classes
        x = _transformed(x_row, offset_ptr, offs, mask, target, softcap, margin, logit_scale, HAS_SOFTCAP,
                         HAS_OFFSET, HAS_MARGIN)  # fmt: skip
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        rescale = tl.exp(m - m_new)
        s, compensation = s * rescale, compensation * rescale
        # the block's maxima add exactly 1 each; the rest are summed apart, so that a confident row's tiny terms
        # are not rounded away against that 1 inside the block's own sum
        at_max = x == m_new
        s, compensation = _kahan_add(s, compensation, tl.sum(tl.where(at_max, 1.0, 0.0), 0))
        s, compensation = _kahan_add(s, compensation, tl.sum(tl.where(at_max, 0.0, tl.exp(x - m_new)), 0))
        m = m_new
        w = _block_weights(weight_ptr, t_row, offs, mask, smoothing, num_classes, HAS_WEIGHT, PROBS)
        weighted_sum += tl.sum(w * tl.where(mask, x, 0.0), 0)
        total_weight += tl.sum(w, 0)
    log_s = tl.log(s) - compensation / s  # log(s - c) to first order
    lse = m + log_s  # for the terms that need it whole; the target's own term keeps (m - x_y) + log Σ apart

    # row statistics: loss and the softmax coefficient of the gradient
    if PROBS:
        loss = total_weight * lse - weighted_sum + z_loss * lse * lse
        coefficient = total_weight + 2.0 * z_loss * lse
        target = 0
        target_weight = 0.0
        uniform = 0.0
    else:
        target_logit = _transformed(x_row, offset_ptr, target, True, target, softcap, margin, logit_scale,
                                    HAS_SOFTCAP, HAS_OFFSET, HAS_MARGIN)  # fmt: skip
        if HAS_WEIGHT:
            target_weight = tl.load(weight_ptr + target).to(tl.float32)
        else:
            target_weight = 1.0
        target_weight = tl.where(valid, target_weight, 0.0)
        main_weight = target_weight  # w_y α_y
        if HAS_ALPHA:
            main_weight *= tl.load(alpha_ptr + row).to(tl.float32)
        uniform = tl.where(valid, smoothing / num_classes, 0.0)  # ε/C, 0 for an ignored row
        u = (target_logit - m) - log_s  # log p_y, without forming lse
        value, derivative = _target_term(u, smoothing, num_classes, p0, p1, p2, TERM)
        hard = -main_weight * derivative  # g = -w_y α_y ψ'(u), the gradient's weight at the target
        loss = main_weight * value
        # without smoothing Σ w_c z_c is not part of the loss: a masked class (-inf) must not make it 0 · -inf
        loss += tl.where(uniform != 0.0, uniform * (total_weight * lse - weighted_sum), 0.0)
        loss += z_loss * target_weight * lse * lse
        coefficient = hard + uniform * total_weight + 2.0 * z_loss * target_weight * lse
        # an ignored row is absent whatever it holds: 0 · ψ(u) is NaN when its logits hold NaN or ±inf
        loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, loss)

    # pass 2: the gradient, scaled, in the output dtype
    if HAS_GRAD:
        scale = tl.load(scale_ptr + row)
        g_row = grad_ptr + row * grad_stride
        for start in range(0, num_classes, BLOCK):
            offs = start + cols
            mask = offs < num_classes
            capped = 0.0
            if HAS_SOFTCAP:
                capped = _tanh(tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32) / softcap)
            x = _transformed(x_row, offset_ptr, offs, mask, target, softcap, margin, logit_scale, HAS_SOFTCAP,
                             HAS_OFFSET, HAS_MARGIN)  # fmt: skip
            # float32, from log p = (x - m) - log Σ: exp(x - lse) would lose p_y - 1 ≈ -1e-7 of a confident row
            # (lse = m + 1e-7 rounds to m), and a rounded (bfloat16) probability would lose it too
            log_p = (x - m) - log_s
            grad = tl.exp(log_p) * coefficient
            w = _block_weights(weight_ptr, t_row, offs, mask, smoothing, num_classes, HAS_WEIGHT, PROBS)
            if PROBS:
                grad -= w
            else:
                # at the target: a·p_y - g = g·(p_y - 1) + (a - g)·p_y, with p_y - 1 = expm1(log p_y)
                at_target = hard * _expm1(log_p) + (coefficient - hard) * tl.exp(log_p)
                grad = tl.where(offs == target, at_target, grad) - uniform * w
            grad *= logit_scale
            if HAS_SOFTCAP:
                grad *= 1.0 - capped * capped
            if not PROBS:
                grad = tl.where(valid, grad, 0.0)
            tl.store(g_row + offs, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def block_size(num_classes: int) -> int:
    """Columns per block: the row rounded up to a power of two, at most :data:`MAX_BLOCK` (16 in the interpreter,
    where every block is simulated in NumPy and small blocks keep the tests quick)."""
    limit = 16 if _interpreted() else MAX_BLOCK
    return min(limit, cast(int, triton.next_power_of_2(num_classes)))


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def loss_and_grad_(
    logits: torch.Tensor,
    grad: torch.Tensor | None,
    target: torch.Tensor,
    options: RowLoss,
    grad_scale: torch.Tensor,
    *,
    block: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """The Triton row kernel, with the contract of :func:`xent.kernels.chunked.loss_and_grad_`.

    ``block`` (columns per block, :func:`block_size` by default) and ``num_warps`` are the launch configuration:
    4,096 and 4 reached 92 % of an H100's copy bandwidth, the best of ``benchmarks/gpu_roofline.py``'s sweep.
    """
    num_rows, num_classes = logits.shape
    if logits.stride(1) != 1 or (grad is not None and grad.stride(1) != 1):
        raise ValueError("the Triton cross-entropy kernel needs rows with unit column stride")
    losses = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return losses.to(accumulation_dtype(logits.dtype))
    probs = target.is_floating_point()
    if probs:
        target = target.contiguous()

    @overload
    def float32(tensor: torch.Tensor) -> torch.Tensor: ...
    @overload
    def float32(tensor: None) -> None: ...
    def float32(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device=logits.device, dtype=torch.float32).contiguous()

    weight, offset, token_weight = float32(options.weight), float32(options.class_offset), float32(options.token_weight)
    scale = float32(grad_scale) if token_weight is None else float32(grad_scale) * token_weight
    alpha = margin = None
    if not probs and (options.alpha is not None or options.target_margin is not None):
        safe_target = torch.where(target == options.ignore_index, 0, target)
        alpha = None if options.alpha is None else float32(options.alpha)[safe_target]
        margin = None if options.target_margin is None else float32(options.target_margin)[safe_target]
    term, p0, p1, p2 = term_parameters(options.term)
    row_loss_kernel[(num_rows,)](
        logits,
        logits.stride(0),
        grad if grad is not None else logits,
        grad.stride(0) if grad is not None else 0,
        target,
        target.stride(0) if probs else 0,
        weight if weight is not None else scale,
        scale,
        losses,
        offset if offset is not None else scale,
        alpha if alpha is not None else scale,
        margin if margin is not None else scale,
        num_classes,
        options.ignore_index,
        options.label_smoothing,
        options.z_loss,
        options.softcap or 1.0,
        options.logit_scale,
        p0,
        p1,
        p2,
        PROBS=probs,
        HAS_WEIGHT=weight is not None,
        HAS_SOFTCAP=options.softcap is not None,
        HAS_GRAD=grad is not None,
        HAS_OFFSET=offset is not None,
        HAS_ALPHA=alpha is not None,
        HAS_MARGIN=margin is not None,
        TERM=term,
        BLOCK=block or block_size(num_classes),
        num_warps=num_warps,
    )
    if token_weight is not None:
        losses *= token_weight
    return losses.to(accumulation_dtype(logits.dtype))
