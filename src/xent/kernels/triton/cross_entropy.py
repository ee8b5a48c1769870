"""Cross-entropy on GPUs in Triton: one program per row, the loss and the gradient in one launch.

Data flow of :func:`cross_entropy_kernel` for row ``n`` of logits ``(M, C)``::

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

import torch
import triton
import triton.language as tl

from xent.losses._reduce import accumulation_dtype
from xent.losses.softmax import SoftmaxOptions

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


@triton.jit
def cross_entropy_kernel(
    logits_ptr,  # (M, C) read only, any float dtype — unless it is grad_ptr
    logits_stride,  # elements between rows
    grad_ptr,  # (M, C) overwritten with scale · ∂loss/∂logits (may alias logits_ptr); unused without HAS_GRAD
    grad_stride,
    target_ptr,  # (M,) int64 class indices, or (M, C) probabilities (PROBS)
    target_stride,  # elements between rows of probabilities
    weight_ptr,  # (C,) float32 class weights, read only (HAS_WEIGHT)
    scale_ptr,  # (M,) float32 per-row gradient scale, read only
    loss_ptr,  # (M,) float32, written
    num_classes,
    ignore_index,
    smoothing,
    z_loss,
    softcap,
    PROBS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    t_row = target_ptr + row * target_stride
    cols = tl.arange(0, BLOCK)

    # pass 1: online log-sum-exp and the row sums
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    compensation = tl.zeros((), tl.float32)  # Kahan: what adding each block's small Σ to a large s rounded away
    weighted_sum = tl.zeros((), tl.float32)  # Σ w_c x_c (indices) or Σ w_c t'_c x_c (probabilities)
    total_weight = tl.zeros((), tl.float32)  # Σ w_c (indices) or Σ w_c t'_c (probabilities)
    for start in range(0, num_classes, BLOCK):
        offs = start + cols
        mask = offs < num_classes
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
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
        target = tl.load(target_ptr + row).to(tl.int64)
        valid = target != ignore_index
        target = tl.where(valid, target, 0)
        target_logit = tl.load(x_row + target).to(tl.float32)
        if HAS_SOFTCAP:
            target_logit = softcap * _tanh(target_logit / softcap)
        if HAS_WEIGHT:
            target_weight = tl.load(weight_ptr + target).to(tl.float32)
        else:
            target_weight = 1.0
        target_weight = tl.where(valid, target_weight, 0.0)
        uniform = tl.where(valid, smoothing / num_classes, 0.0)  # ε/C, 0 for an ignored row
        loss = (1.0 - smoothing) * target_weight * ((m - target_logit) + log_s)
        loss += uniform * (total_weight * lse - weighted_sum) + z_loss * target_weight * lse * lse
        coefficient = (1.0 - smoothing) * target_weight + uniform * total_weight + 2.0 * z_loss * target_weight * lse
    tl.store(loss_ptr + row, loss)

    # pass 2: the gradient, scaled, in the output dtype
    if HAS_GRAD:
        scale = tl.load(scale_ptr + row)
        g_row = grad_ptr + row * grad_stride
        for start in range(0, num_classes, BLOCK):
            offs = start + cols
            mask = offs < num_classes
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                capped = _tanh(x / softcap)
                x = softcap * capped
            # float32, from log p = (x - m) - log Σ: exp(x - lse) would lose p_y - 1 ≈ -1e-7 of a confident row
            # (lse = m + 1e-7 rounds to m), and a rounded (bfloat16) probability would lose it too
            log_p = (x - m) - log_s
            grad = tl.exp(log_p) * coefficient
            w = _block_weights(weight_ptr, t_row, offs, mask, smoothing, num_classes, HAS_WEIGHT, PROBS)
            if PROBS:
                grad -= w
            else:
                # at the target: a·p_y - (1-ε)w_y = (1-ε)w_y·(p_y - 1) + (a - (1-ε)w_y)·p_y; p_y - 1 = expm1(log p_y)
                hard = (1.0 - smoothing) * target_weight
                at_target = hard * _expm1(log_p) + (coefficient - hard) * tl.exp(log_p)
                grad = tl.where(offs == target, at_target, grad) - uniform * w
            if HAS_SOFTCAP:
                grad *= 1.0 - capped * capped
            tl.store(g_row + offs, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def block_size(num_classes: int) -> int:
    """Columns per block: the row rounded up to a power of two, at most :data:`MAX_BLOCK` (16 in the interpreter,
    where every block is simulated in NumPy and small blocks keep the tests quick)."""
    limit = 16 if _interpreted() else MAX_BLOCK
    return min(limit, triton.next_power_of_2(num_classes))


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def loss_and_grad_(
    logits: torch.Tensor,
    grad: torch.Tensor | None,
    target: torch.Tensor,
    options: SoftmaxOptions,
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
    weight = options.weight
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=torch.float32).contiguous()
    scale = grad_scale.to(torch.float32).contiguous()
    cross_entropy_kernel[(num_rows,)](
        logits,
        logits.stride(0),
        grad if grad is not None else logits,
        grad.stride(0) if grad is not None else 0,
        target,
        target.stride(0) if probs else 0,
        weight if weight is not None else scale,
        scale,
        losses,
        num_classes,
        options.ignore_index,
        options.label_smoothing,
        options.z_loss,
        options.softcap or 1.0,
        PROBS=probs,
        HAS_WEIGHT=weight is not None,
        HAS_SOFTCAP=options.softcap is not None,
        HAS_GRAD=grad is not None,
        BLOCK=block or block_size(num_classes),
        num_warps=num_warps,
    )
    return losses.to(accumulation_dtype(logits.dtype))
