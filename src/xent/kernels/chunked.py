"""Memory-lean cross-entropy in pure PyTorch, for any device.

Data flow of :class:`ChunkedRowLoss` (logits ``(M, C)``, gradient buffer ``G`` of the same shape)::

    for each block of rows (sized to stay in cache):
        x  = logits[block]                         (upcast to float32 for half precision)
        x  = c · tanh(x / c)                       (softcap only)
        G[block] = softmax(x)                       one fused operation, written straight into G
        lse = x_y - log G[y]                        row statistics: O(block) memory (CPU, class indices: see
                                                    _RowTerms._lse_; elsewhere max x - log max G[block])
        loss[block] from lse, x_y, Σ w·x
        G[block] = scale · (softmax · a - b)        the gradient of the loss, formed in place
    backward: G · grad_output                       one pass, skipped when grad_output is exactly 1

so the forward reads the logits once and writes the gradient once; extra memory is O(M) plus one block. With
``inplace_backward=True``, ``G`` *is* the logits' storage.

:func:`~xent.kernels.linear.fused_pass` does it one level up: blocks of tokens → logits block ``X_b Wᵀ`` → the
block loop above on it, in place → ``dX_b = G_b W``, ``dW += G_bᵀ X_b``, ``db += Σ G_b``. The ``N × V``
logits never exist; peak extra memory is one logits block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast, overload

import torch

from xent.core import rows
from xent.core.autocast import autocast_off
from xent.core.reduce import accumulation_dtype, safe_divide
from xent.core.reference import reference_loss
from xent.core.rowloss import RowLoss, mean_denominator
from xent.kernels.threads import for_each_block
from xent.kernels.triton import triton_installed

# Rows per block are chosen so that one float32 block is about this size. On the CPU ~8 passes run over a block while
# it is in cache, and each pass costs a few microseconds of dispatch however small the block: on the 2-core CI machine
# (1 MB L2 per core, 32 MB L3) the row kernel took 0.56 s at 512 KB blocks (4 rows of 32,000 classes), 0.43 s at
# 2 MB, 0.32 s at 4 MB and 0.36–0.39 s at 8–16 MB on 8,192 × 32,000 logits — 4 MB it is. On a GPU each pass is a
# kernel launch, so blocks are larger still (with a 512 KB block the Llama-3 head's 8,192 × 128,256 logits took 1.46 s
# on an H100, one row per block).
BLOCK_BYTES = 4 << 20
ACCELERATOR_BLOCK_BYTES = 64 << 20
# Below this a probability loses bits as a float32 (normal floats end at 2^-126): the log-sum-exp is not read from it.
TINY_PROBABILITY = 2.0**-64


def rows_per_block(num_classes: int, device: torch.device | None = None) -> int:
    block_bytes = BLOCK_BYTES if device is None or device.type == "cpu" else ACCELERATOR_BLOCK_BYTES
    return max(1, block_bytes // (4 * num_classes))


def loss_and_grad_(
    logits: torch.Tensor,
    grad: torch.Tensor | None,
    target: torch.Tensor,
    options: RowLoss,
    grad_scale: torch.Tensor,
    *,
    block_rows: int | None = None,
) -> torch.Tensor:
    """Per-row losses of ``logits`` ``(M, C)``, writing ``grad_scale[m] · ∂loss_m/∂logits[m]`` into ``grad``.

    Args:
        logits: ``(M, C)``, read only — unless it is ``grad`` itself.
        grad: ``(M, C)``, overwritten with the scaled gradient; may be ``logits`` (in place); ``None`` computes
            the losses only (the gradient goes to a scratch block).
        target: ``(M,)`` class indices or ``(M, C)`` probabilities.
        options: the loss options.
        grad_scale: ``(M,)`` per-row factor of the gradient, e.g. ``1 / denominator`` for "mean"; rows whose
            target is ``options.ignore_index`` get loss and gradient 0 whatever their scale.
        block_rows: rows per block; by default about :data:`BLOCK_BYTES` of float32 on the CPU,
            :data:`ACCELERATOR_BLOCK_BYTES` elsewhere.

    Returns:
        ``(M,)`` losses in the accumulation dtype, ignored rows 0.
    """
    num_rows, num_classes = logits.shape
    dtype = accumulation_dtype(logits.dtype)
    block_rows = block_rows or rows_per_block(num_classes, logits.device)
    terms = _RowTerms(logits, target, options, grad_scale.to(dtype))

    def block_(block: slice) -> None:
        terms.block_(logits[block], None if grad is None else grad[block], block)

    for_each_block(num_rows, block_rows, block_, logits.device)  # threads share the blocks out: see kernels.threads
    return terms.losses()


class _RowTerms:
    r"""The per-row side of the loss: everything that does not need the softmax is computed for all rows at once,
    so that the block loop runs only the passes over ``(B, C)`` data: two for plain cross-entropy on the CPU (the
    softmax and its scaling), up to about eight with every option. The row algebra — the transform, the losses, the
    gradient's coefficients — is that of :mod:`xent.core.rows`; with probabilities :math:`t'` the gradient is
    ``p · (Σ w t' + 2 ζ lse) − w ⊙ t'``. The chain rule through the transform multiplies by the scale :math:`s` and
    the soft cap's :math:`1 - \tanh^2`.
    """

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, options: RowLoss, scale: torch.Tensor):
        num_rows, num_classes = logits.shape
        self.dtype = dtype = scale.dtype
        device = logits.device

        @overload
        def per_class(tensor: torch.Tensor) -> torch.Tensor: ...
        @overload
        def per_class(tensor: None) -> None: ...
        def per_class(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        # the per-class tensors in the accumulation dtype once, not once per block
        self.options = options = dataclasses.replace(
            options,
            weight=per_class(options.weight),
            class_offset=per_class(options.class_offset),
            target_margin=per_class(options.target_margin),
        )
        self.target, self.num_classes = target, num_classes
        self.weight = options.weight
        self.token_weight = per_class(options.token_weight)
        self.scale = scale if self.token_weight is None else scale * self.token_weight  # grad_scale · r_n
        self.soft = target.is_floating_point()
        self.lse = logits.new_empty(num_rows, dtype=dtype)
        # On the CPU a row's log-sum-exp is read from its target's probability (one pass fewer, see `_lse_`);
        # elsewhere that would need a host read per block for the rows whose probability underflows.
        self.lse_from_target = device.type == "cpu" and not self.soft
        self.margin = None  # (M, 1) m_y, for a description with target margins (class indices only)
        if self.soft:
            self.target_term = logits.new_empty(num_rows, dtype=dtype)  # Σ_c w_c t'_c z_c
            self.mass = logits.new_empty(num_rows, dtype=dtype)  # Σ_c w_c t'_c
            return
        valid = target != options.ignore_index
        self.safe_target = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)  # (M, 1)
        safe_target = self.safe_target.squeeze(1)
        self.kept = valid
        self.ignored_rows = _IgnoredRows(valid)
        valid_weight = valid.to(dtype)
        target_weight = valid_weight if self.weight is None else self.weight[safe_target] * valid_weight  # v w_y
        main_weight = target_weight
        if options.alpha is not None:
            main_weight = main_weight * per_class(options.alpha)[safe_target]
        total_weight = float(num_classes) if self.weight is None else self.weight.sum()
        self.rows = rows.TargetRows(valid_weight, target_weight, main_weight, total_weight)
        self.margin = None if options.target_margin is None else options.target_margin[self.safe_target]  # (M, 1)
        target_logit = logits.gather(1, self.safe_target).to(dtype)
        target_logit, _ = rows.transform(target_logit, options, classes=self.safe_target, margin=self.margin)
        self.target_logit = target_logit.squeeze(1)  # z_y
        if options.label_smoothing:
            self.smooth_logit = logits.new_empty(num_rows, dtype=dtype)  # Σ_c w_c z_c
            self.uniform = (valid_weight * self.scale * (options.label_smoothing / num_classes)).unsqueeze(1)

    def block_(self, logits: torch.Tensor, grad: torch.Tensor | None, block: slice) -> None:
        """Statistics of one block of rows, and its scaled gradient written into ``grad`` (when given)."""
        dtype, options, weight = self.dtype, self.options, self.weight
        # The gradient is formed in `work`: the output itself when it has the accumulation dtype, else a block.
        work = grad if grad is not None and grad.dtype == dtype else logits.new_empty(logits.shape, dtype=dtype)
        x, capped = rows.transform(
            logits if logits.dtype == dtype else logits.to(dtype),
            options,
            target_column=None if self.soft else self.safe_target[block],
            margin=None if self.margin is None else self.margin[block],
        )
        # Everything that reads the logits runs before `work`, which may alias them, is overwritten.
        survives = x.data_ptr() != work.data_ptr()
        row_max = None if self.lse_from_target and survives else x.amax(dim=1)
        if self.soft:
            probs = self.target[block].to(dtype)
            if options.label_smoothing:
                probs = probs * (1.0 - options.label_smoothing) + options.label_smoothing / self.num_classes
            weighted_probs = probs if weight is None else probs * weight  # (B, C)
            self.target_term[block] = (weighted_probs * x).sum(1)
            self.mass[block] = weighted_probs.sum(1)
        elif options.label_smoothing:
            self.smooth_logit[block] = x.sum(1) if weight is None else x @ weight

        # One fused pass (max, Σ exp, normalise) writes the softmax, and the log-sum-exp follows from it.
        torch._softmax(x, 1, False, out=work)
        lse = self._lse_(x if survives else None, row_max, work, block)

        scale = self.scale[block]
        if self.soft:
            coefficient = self.mass[block]
            if options.z_loss:
                coefficient = coefficient + 2.0 * options.z_loss * lse
        else:
            coefficient, slope = rows.gradient_coefficients(
                self.target_logit[block] - lse, lse, self.rows[block], options, self.num_classes
            )
        work.mul_((coefficient * scale).unsqueeze(1))
        if self.soft:
            work.sub_(weighted_probs * scale.unsqueeze(1))
        else:
            work.scatter_add_(1, self.safe_target[block], (slope * scale).unsqueeze(1))
            if options.label_smoothing:
                work.sub_(self.uniform[block] if weight is None else self.uniform[block] * weight)
        if options.logit_scale != 1.0:
            work.mul_(options.logit_scale)
        if capped is not None:
            work.mul_(capped.square_().neg_().add_(1.0))
        if not self.soft:
            self.ignored_rows.zero_(work, block)
        if grad is not None and work is not grad:
            grad.copy_(work)

    def _lse_(
        self, x: torch.Tensor | None, row_max: torch.Tensor | None, probs: torch.Tensor, block: slice
    ) -> torch.Tensor:
        """The log-sum-exp of a block's rows from their softmax ``probs``, stored and returned. ``x`` is the block's
        transformed logits while they still exist (None once ``probs`` has overwritten them), ``row_max`` their
        row maxima when computed before the softmax.

        In general it is ``max - log p_max``: the largest probability is that of the largest logit, exp(max - lse)
        ≥ 1/C, which never underflows — but it costs a pass over ``probs``. On the CPU the target's probability
        gives it without that pass, ``z_y - log p_y``, as precisely wherever ``p_y`` is a normal float; the rows
        where it is tiny (a loss above 44, rare) take the general way, found by one host read of a ``(B,)`` mask,
        free on the CPU.
        """
        if not self.lse_from_target:
            lse = cast(torch.Tensor, row_max) - torch.log(probs.amax(dim=1))
        else:
            target_prob = probs.gather(1, self.safe_target[block]).squeeze(1)
            lse = self.target_logit[block] - torch.log(target_prob)
            is_tiny = (target_prob < TINY_PROBABILITY).logical_and_(self.kept[block])
            tiny = is_tiny.nonzero().squeeze(1)
            if 4 * tiny.numel() >= target_prob.numel():  # most rows (extreme logits): whole-block passes
                maxima = row_max if row_max is not None else cast(torch.Tensor, x).amax(dim=1)
                lse = torch.where(is_tiny, maxima - torch.log(probs.amax(dim=1)), lse)
            elif tiny.numel():  # a few rows: only theirs
                maxima = row_max[tiny] if row_max is not None else cast(torch.Tensor, x)[tiny].amax(dim=1)
                lse[tiny] = maxima - torch.log(probs[tiny].amax(dim=1))
        self.lse[block] = lse
        return lse

    def losses(self) -> torch.Tensor:
        """``(M,)`` losses, once every block has run."""
        lse, options = self.lse, self.options
        if self.soft:
            loss = self.mass * lse - self.target_term
            if options.z_loss:
                loss = loss + options.z_loss * lse.square()
        else:
            smooth = self.smooth_logit if options.label_smoothing else None
            loss = rows.row_losses(self.target_logit - lse, lse, smooth, self.rows, options, self.num_classes)
            # an ignored row's terms are 0 · ψ(u) and the like: NaN when its logits hold NaN or ±inf
            loss = torch.where(self.kept, loss, 0.0)
        return loss if self.token_weight is None else loss * self.token_weight


class _IgnoredRows:
    """Zeroes the gradient rows of ignored targets in a block. They are 0 by construction when the row is finite,
    but a row holding NaN or ±inf (a masked class at the placeholder target, a NaN activation) gives a NaN softmax
    that the zero coefficient cannot cancel (0 · NaN). On the CPU the ignored rows are listed once (no device sync
    there) and only their rows are written; elsewhere a mask over each block avoids the host read."""

    def __init__(self, kept: torch.Tensor):
        self.on_cpu = kept.device.type == "cpu"
        if self.on_cpu:
            self.rows = (~kept).nonzero().squeeze(1)  # (I,) sorted
            self.count = self.rows.numel()
        else:
            self.mask = (~kept).unsqueeze(1)  # (M, 1)

    def zero_(self, work: torch.Tensor, rows: slice) -> None:
        if not self.on_cpu:
            work.masked_fill_(self.mask[rows], 0.0)
            return
        if not self.count:
            return
        first, last = torch.searchsorted(self.rows, torch.tensor([rows.start, rows.stop])).tolist()
        if first < last:
            work.index_fill_(0, self.rows[first:last] - rows.start, 0.0)


# A row kernel: `kernel(logits, grad, target, options, grad_scale) -> losses`, with the contract of
# `loss_and_grad_` — per-row losses, and the scaled gradient written into `grad` (which may be `logits`, or None).
RowKernel = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, RowLoss, torch.Tensor], torch.Tensor]


SECOND_ORDER_MESSAGE = (
    "xent's fused kernels (impl='chunked' or 'triton', the automatic choice for training-sized problems, and "
    "linear_cross_entropy) form the gradient in the forward pass and cannot differentiate it again; "
    "pass impl='reference' for second-order gradients (create_graph=True)"
)


def refuse_second_order() -> None:
    """Raise in a fused Function's backward when asked for a differentiable gradient (``create_graph=True``, which
    runs backward with grad mode on): the stored gradient has no graph, so a second derivative would silently miss
    its dependence on the inputs."""
    if torch.is_grad_enabled():
        raise RuntimeError(SECOND_ORDER_MESSAGE)


def reference_gradients(
    reference: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, ...],
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients, for the inputs flagged in ``needs``, of ``reference(*inputs)`` contracted with ``grad_output``.

    The fused kernels form the logits' (or the head's) gradient themselves; the rare extra inputs — probability
    targets and class weights that require grad — get theirs from the plain reference, recomputed here in backward,
    so every implementation has the reference's gradient by construction.
    """
    with torch.enable_grad(), autocast_off(grad_output):
        leaves = tuple(
            None if tensor is None else tensor.detach().requires_grad_(need)
            for tensor, need in zip(inputs, needs, strict=True)
        )
        # an input that needs a gradient is a tensor
        wanted = [cast(torch.Tensor, leaf) for leaf, need in zip(leaves, needs, strict=True) if need]
        grads = iter(torch.autograd.grad(reference(*leaves), wanted, grad_output))
    return tuple(next(grads) if need else None for need in needs)


@dataclasses.dataclass(frozen=True)
class ChunkedCall:
    """What a :class:`ChunkedRowLoss` call runs, beside the tensors autograd differentiates: the description,
    the reduction and the row kernel."""

    options: RowLoss
    reduction: str
    kernel: RowKernel


class ChunkedRowLoss(torch.autograd.Function):
    """Cross-entropy on canonical logits with the gradient formed in the forward pass (see the module docstring)
    by a row kernel, :func:`loss_and_grad_` on any device or the Triton kernel on GPUs, and written over the
    logits' own storage (``inplace_backward=True``), which a custom operator may not do to its input: every other
    fused call runs the operator ``xent::row_loss`` (:mod:`xent.kernels.ops`), which ``torch.compile`` sees.
    ``weight`` is ``call.options.weight``, passed apart so that autograd sees it."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, call: ChunkedCall
    ) -> torch.Tensor:
        options, reduction = call.options, call.reduction
        dtype = accumulation_dtype(logits.dtype)
        scale = torch.ones((), dtype=dtype, device=logits.device)
        if reduction == "mean":
            scale = safe_divide(scale, mean_denominator(target, options, dtype))
        grad = logits if ctx.needs_input_grad[0] else None
        losses = call.kernel(logits, grad, target, options, scale.expand(logits.shape[0]))
        ctx.call = call
        ctx.grad = grad  # kept on ctx, not saved: it is the logits, changed on purpose
        if any(ctx.needs_input_grad[1:3]):  # refused up front by `inplace_row_loss`
            ctx.save_for_backward(logits, target, weight)
        if reduction == "none":
            return losses
        return losses.sum() * scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        refuse_second_order()
        call: ChunkedCall = ctx.call
        grad_target = grad_weight = None
        if any(ctx.needs_input_grad[1:3]):
            logits, target, weight = ctx.saved_tensors

            def reference(target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
                options = dataclasses.replace(call.options, weight=weight)
                return reference_loss(logits, target, options, call.reduction)

            grad_target, grad_weight = reference_gradients(
                reference, (target, weight), ctx.needs_input_grad[1:3], grad_output
            )
        if not ctx.needs_input_grad[0]:
            return None, grad_target, grad_weight, None
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "the chunked cross_entropy scales its stored gradient in place, so it can be backpropagated once; "
                "use impl='reference' to backpropagate through the graph twice"
            )
        scale = grad_output.unsqueeze(1) if call.reduction == "none" else grad_output
        ctx.grad = None
        scale_(grad, scale)
        return grad, grad_target, grad_weight, None


def is_one(value: torch.Tensor) -> bool:
    """Whether a scalar is exactly 1 — checked only on the CPU, where reading it costs no device sync."""
    return value.device.type == "cpu" and value.numel() == 1 and value.item() == 1.0


def scale_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad *= factor`` in place (``factor`` broadcasts), skipped when it is a scalar exactly 1 — as it is for a
    plain ``loss.backward()`` — with no host sync: on CUDA with triton installed a kernel reads it on the device."""
    if factor.numel() == 1 and grad.is_cuda and grad.is_contiguous() and triton_installed():
        from xent.kernels.triton.scale import scale_unless_one_

        scale_unless_one_(grad, factor)
    elif not is_one(factor):
        grad.mul_(factor.to(grad.dtype))


def inplace_row_loss(
    logits: torch.Tensor, target: torch.Tensor, options: RowLoss, reduction: str, *, kernel: RowKernel | None = None
) -> torch.Tensor:
    """Cross-entropy of canonical logits ``(M, C)`` by :class:`ChunkedRowLoss`, already reduced, the gradient
    written over the logits; ``kernel`` defaults to :func:`loss_and_grad_`. Backward scales the stored gradient in
    place and returns it — no logits-sized buffer at all — so the graph can be backpropagated once."""
    if torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (target, options.weight)
    ):
        raise ValueError(
            "inplace_backward=True overwrites the logits, which the gradient of a target or weight that requires "
            "grad is computed from; detach them or leave inplace_backward off"
        )
    if not logits.is_contiguous():
        logits = logits.contiguous()
    return cast(
        torch.Tensor,
        ChunkedRowLoss.apply(
            logits,
            target,
            options.weight,
            ChunkedCall(options, reduction, kernel or loss_and_grad_),
        ),
    )
