"""Fused linear cross-entropy in pure PyTorch: the ``N × V`` logits are never materialised.

Data flow of :func:`fused_pass`, which the custom operator ``xent::linear_row_loss`` runs (:mod:`xent.kernels.ops`),
for ``reduction="mean"``/``"sum"`` (the gradient of a scalar loss is known up to one factor in the forward pass)::

    for each chunk of tokens X_c (c × D):
        L_c  = X_c Wᵀ + b                       GEMM 1, a (c × V) buffer reused by every chunk
        G_c  = ∂loss/∂L_c, in place over L_c     the cache-blocked softmax pass of xent.kernels.chunked
        dX_c = G_c W                            GEMM 2, written into its rows of dX
        dW  += G_cᵀ X_c                         GEMM 3, summed in float32 inside the GEMM, added to dW in its
                                                dtype (no atomics: deterministic)
        db  += Σ_rows G_c                       in float32
    backward: dX, dW, db · grad_output          skipped when grad_output is exactly 1

so the work is the floor — three GEMMs — plus one pass over each logits chunk, and the memory beyond the gradients
is one logits chunk. The price of that memory is the update of ``dW``: it reads and writes all of ``dW`` once per
chunk, which is bandwidth-bound below ~500 tokens a chunk on an H100 (3 TB/s against 740 TFLOP/s of bf16 GEMM),
hence :data:`ACCELERATOR_CHUNK_TOKENS`; and a half-precision ``dW`` is rounded once per chunk (``weight_grad_dtype=
torch.float32`` sums in a float32 buffer instead: 2 bytes × V × D more memory and twice that traffic).

``reduction="none"`` cannot be done that way: each token's gradient is scaled by its own ``grad_output[n]``
*before* the sum over tokens that forms ``dW``, so its forward computes only the losses and its backward recomputes
the logits chunk by chunk with the scale applied (four GEMMs in all, the same memory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import cast

import torch

from xent.core.reduce import accumulation_dtype
from xent.core.rowloss import RowLoss
from xent.kernels import buffers, chunked

# Bytes of one float32 logits chunk (c × V) on the CPU, where the chunk is the only memory beyond the inputs and
# their gradients, and larger chunks change little once every GEMM is big enough to run at full rate.
CPU_CHUNK_BYTES = 128 << 20
# Tokens per chunk on GPUs: the chunk's d(weight) GEMM turns from bandwidth- to compute-bound above ~500 tokens on an
# H100. Measured there (benchmarks/gpu_roofline.py --part gemm, Llama-3-8B head, bf16): the three GEMMs of all
# chunks take 1.76× the whole-matrix floor at 256 tokens, 1.22× at 512, 1.10× at 1024, 1.08× at 2048.
ACCELERATOR_CHUNK_TOKENS = 1024
# ...or more tokens where V is small, so that a chunk is at least this big (fewer, larger GEMMs)
MIN_ACCELERATOR_CHUNK_BYTES = 64 << 20


def default_chunk_size(num_tokens: int, vocab_size: int, device: torch.device, itemsize: int = 4) -> int:
    """Tokens per chunk: a float32 logits chunk of :data:`CPU_CHUNK_BYTES` on the CPU; on GPUs
    :data:`ACCELERATOR_CHUNK_TOKENS` (more for a small V, fewer if the chunk would take over an eighth of the free
    memory). ``itemsize``: bytes per logit."""
    if device.type != "cuda":
        return max(1, min(num_tokens, CPU_CHUNK_BYTES // (4 * vocab_size)))
    row_bytes = itemsize * vocab_size
    free, _ = torch.cuda.mem_get_info(device)
    tokens = max(ACCELERATOR_CHUNK_TOKENS, MIN_ACCELERATOR_CHUNK_BYTES // row_bytes)
    return max(1, min(num_tokens, tokens, free // 8 // row_bytes))


def _accumulate_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` in one GEMM with float32 accumulation when ``out`` has the dtype of ``a`` and ``b``, or is
    float32 on CUDA (cuBLAS reads and writes the half-precision product's float32 ``out`` itself); otherwise the
    product is formed apart, rounded, and added to the wider ``out``."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif a.is_cuda and out.dtype == torch.float32:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out.add_(torch.mm(a, b))


def _chunks(num_tokens: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, num_tokens, chunk_size):
        yield slice(start, min(start + chunk_size, num_tokens))


# A chunk loss: `chunk_loss(logits, rows, grad_scale, needs_grad) -> losses` — the losses of the chunk `rows` of
# tokens whose logits `(c, V)` it is given, with the gradient scaled per token by `grad_scale (c,)` written over
# `logits` when `needs_grad`.
ChunkLoss = Callable[[torch.Tensor, slice, torch.Tensor, bool], torch.Tensor]
# The gradients dX, dW, db, each None when not needed.
_Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def row_kernel_loss(target: torch.Tensor, options: RowLoss, kernel: chunked.RowKernel) -> ChunkLoss:
    """The chunk loss of a row-loss description: the row kernel, in place on each chunk's logits."""

    def chunk_loss(logits: torch.Tensor, rows: slice, grad_scale: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        chunk_options = options
        if options.token_weight is not None:
            chunk_options = dataclasses.replace(options, token_weight=options.token_weight[rows])
        return kernel(logits, logits if needs_grad else None, target[rows], chunk_options, grad_scale)

    return chunk_loss


def fused_pass(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    chunk_loss: ChunkLoss,
    grad_scale: torch.Tensor,
    chunk_size: int,
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token losses ``(N,)``; the gradients, each scaled per token by ``grad_scale``, into ``grads``.

    Args:
        input: ``(N, D)``, read only.
        linear_weight: ``(V, D)``, read only.
        linear_bias: ``(V,)`` or ``None``, read only.
        chunk_loss: the loss of each chunk of logits (see :data:`ChunkLoss`).
        grad_scale: ``(N,)`` factor of each token's gradient.
        grads: ``dX (N, D)`` overwritten, ``dW (V, D)`` and ``db (V,)`` (float32 or float64) accumulated into;
            each ``None`` when not needed.
        kept: ``(N,)`` bool, the tokens that count (``None``: all). The others are absent whatever their hidden
            state holds: it is read as zeros, so a NaN there cannot reach ``dW`` through ``0 · NaN`` (their rows of
            the logits' gradient are 0). A copy of one ``(c, D)`` chunk, against the chunk's ``c × V`` logits.
    """
    grad_input, grad_weight, grad_bias = grads
    needs_grad = any(g is not None for g in grads)
    losses = torch.empty(input.shape[0], dtype=accumulation_dtype(input.dtype), device=input.device)
    logits_buffer = None
    for rows in _chunks(input.shape[0], chunk_size):
        x = input[rows]  # (c, D)
        if kept is not None:
            x = torch.where(kept[rows].unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        if logits_buffer is None or logits_buffer.shape[0] < x.shape[0]:
            logits_buffer = buffers.empty((x.shape[0], linear_weight.shape[0]), input.dtype, input.device)
        logits = logits_buffer[: x.shape[0]]  # (c, V)
        if linear_bias is None:
            torch.mm(x, linear_weight.t(), out=logits)
        else:
            torch.addmm(linear_bias, x, linear_weight.t(), out=logits)
        losses[rows] = chunk_loss(logits, rows, grad_scale[rows], needs_grad)
        if grad_input is not None:
            torch.mm(logits, linear_weight, out=grad_input[rows])
        if grad_weight is not None:
            _accumulate_product_(grad_weight, logits.t(), x)
        if grad_bias is not None:
            grad_bias.add_(logits.sum(0, dtype=grad_bias.dtype))
    return losses


def new_grads(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    needs: tuple[bool, ...],
    weight_grad_dtype: torch.dtype,
) -> _Grads:
    """Gradient buffers: dX in the input's dtype, dW in ``weight_grad_dtype``, db in float32 (float64 for float64
    weights)."""
    needs_input, needs_weight, needs_bias = needs
    accumulate = accumulation_dtype(linear_weight.dtype)
    return (
        torch.empty_like(input) if needs_input else None,
        torch.zeros(linear_weight.shape, dtype=weight_grad_dtype, device=linear_weight.device)
        if needs_weight
        else None,
        torch.zeros(linear_weight.shape[0], dtype=accumulate, device=linear_weight.device)
        if needs_bias and linear_bias is not None
        else None,
    )


def cast_grads(
    grads: _Grads, input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None
) -> _Grads:
    grad_input, grad_weight, grad_bias = grads
    return (
        grad_input,
        None if grad_weight is None else grad_weight.to(linear_weight.dtype),
        None if grad_bias is None else grad_bias.to(cast(torch.Tensor, linear_bias).dtype),  # db implies a bias
    )
