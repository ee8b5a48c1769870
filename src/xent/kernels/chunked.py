"""Memory-lean cross-entropy in pure PyTorch, for any device.

Data flow of :class:`ChunkedCrossEntropy` (logits ``(M, C)``, gradient buffer ``G`` of the same shape)::

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

:class:`~xent.kernels.linear.ChunkedLinearLoss` does it one level up: blocks of tokens → logits block ``X_b Wᵀ`` → the
block loop above on it, in place → ``dX_b = G_b W``, ``dW += G_bᵀ X_b``, ``db += Σ G_b``. The ``N × V``
logits never exist; peak extra memory is one logits block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast, overload

import torch

from xent.core.autocast import autocast_off
from xent.core.reduce import accumulation_dtype, safe_divide
from xent.core.reference import reference_cross_entropy
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
    rows = _RowTerms(logits, target, options, grad_scale.to(dtype))

    def block_(block: slice) -> None:
        rows.block_(logits[block], None if grad is None else grad[block], block)

    for_each_block(num_rows, block_rows, block_, logits.device)  # threads share the blocks out: see kernels.threads
    return rows.losses()


class _RowTerms:
    r"""The per-row side of the loss: everything that does not need the softmax is computed for all rows at once,
    so that the block loop runs only the passes over ``(B, C)`` data: two for plain cross-entropy on the CPU (the
    softmax and its scaling), up to about eight with every option.

    With class indices the gradient of a row with respect to the transformed logits :math:`z` is
    ``r · (p · a − b)`` (see :mod:`xent.core.rowloss`) with ``g = −w_y α_y ψ′(u)``,
    ``a = g + ε W / C + 2 ζ w_y lse`` and ``b = g δ_y + (ε / C) w``; with probabilities :math:`t'`,
    ``a = Σ w t' + 2 ζ lse`` and ``b = w ⊙ t'``. The chain rule through the transform multiplies by the scale
    :math:`s` and the soft cap's :math:`1 - \tanh^2`.
    """

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, options: RowLoss, scale: torch.Tensor):
        num_rows, num_classes = logits.shape
        self.dtype = dtype = scale.dtype
        self.options, self.target = options, target
        self.num_classes = num_classes
        device = logits.device

        @overload
        def per_class(tensor: torch.Tensor) -> torch.Tensor: ...
        @overload
        def per_class(tensor: None) -> None: ...
        def per_class(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        self.weight, self.offset = per_class(options.weight), per_class(options.class_offset)
        self.token_weight = per_class(options.token_weight)
        self.scale = scale if self.token_weight is None else scale * self.token_weight  # grad_scale · r_n
        self.soft = target.is_floating_point()
        self.margin = None  # -m_y, added at the target column (class indices only)
        self.lse = logits.new_empty(num_rows, dtype=dtype)
        # On the CPU a row's log-sum-exp is read from its target's probability (one pass fewer, see `_lse_`);
        # elsewhere that would need a host read per block for the rows whose probability underflows.
        self.lse_from_target = device.type == "cpu" and not target.is_floating_point()
        smoothing = options.label_smoothing
        if self.soft:
            self.target_term = logits.new_empty(num_rows, dtype=dtype)  # Σ_c w_c t'_c z_c
            self.mass = logits.new_empty(num_rows, dtype=dtype)  # Σ_c w_c t'_c
            return
        valid = target != options.ignore_index
        self.safe_target = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)  # (M, 1)
        safe_target = self.safe_target.squeeze(1)
        self.valid = valid.to(dtype)
        self.kept = valid
        self.ignored_rows = _IgnoredRows(valid)
        # w_y, zero for ignored rows; w_y α_y for the target term
        self.target_weight = self.valid if self.weight is None else self.weight[safe_target] * self.valid
        self.main_weight = self.target_weight
        if options.alpha is not None:
            self.main_weight = self.main_weight * per_class(options.alpha)[safe_target]
        if options.target_margin is not None:
            self.margin = -per_class(options.target_margin)[safe_target].unsqueeze(1)
        self.target_logit = self._transform(self._cap(logits.gather(1, self.safe_target).to(dtype)), self.safe_target)
        self.target_logit = self.target_logit.squeeze(1)  # z_y
        self.total_weight = float(num_classes) if self.weight is None else self.weight.sum()
        if smoothing:
            self.smooth_logit = logits.new_empty(num_rows, dtype=dtype)  # Σ_c w_c z_c
            self.uniform = (self.valid * self.scale * (smoothing / num_classes)).unsqueeze(1)

    def _cap(self, x: torch.Tensor) -> torch.Tensor:
        cap = self.options.softcap
        return x if cap is None else cap * torch.tanh(x / cap)

    def _transform(self, x: torch.Tensor, columns: torch.Tensor | None, rows: slice = slice(None)) -> torch.Tensor:
        """s (x + o − m_y e_y) of capped logits ``x`` (never in place: ``x`` may be the input); ``columns`` are the
        class ids of ``x``'s columns: ``(B, 1)`` target ids, or None for whole rows."""
        options = self.options
        if self.offset is not None:
            x = x + (self.offset[columns] if columns is not None else self.offset)
        if self.margin is not None:
            x = (
                x + self.margin[rows]
                if columns is not None
                else x.scatter_add(1, self.safe_target[rows], self.margin[rows])
            )
        return x if options.logit_scale == 1.0 else x * options.logit_scale

    def block_(self, logits: torch.Tensor, grad: torch.Tensor | None, rows: slice) -> None:
        """Statistics of one block of rows, and its scaled gradient written into ``grad`` (when given)."""
        dtype, options, weight = self.dtype, self.options, self.weight
        # The gradient is formed in `work`: the output itself when it has the accumulation dtype, else a block.
        work = grad if grad is not None and grad.dtype == dtype else logits.new_empty(logits.shape, dtype=dtype)
        x = logits if logits.dtype == dtype else logits.to(dtype)
        capped = None
        if options.softcap is not None:
            capped = torch.tanh(x / options.softcap)  # kept for the chain rule: d(c·tanh(x/c))/dx = 1 - tanh²
            x = capped * options.softcap
        if options.transforms_per_class:
            x = self._transform(x, None, rows)
        # Everything that reads the logits runs before `work`, which may alias them, is overwritten.
        survives = x.data_ptr() != work.data_ptr()
        row_max = None if self.lse_from_target and survives else x.amax(dim=1)
        if self.soft:
            probs = self.target[rows].to(dtype)
            if options.label_smoothing:
                probs = probs * (1.0 - options.label_smoothing) + options.label_smoothing / self.num_classes
            weighted_probs = probs if weight is None else probs * weight  # (B, C)
            self.target_term[rows] = (weighted_probs * x).sum(1)
            self.mass[rows] = weighted_probs.sum(1)
        elif options.label_smoothing:
            self.smooth_logit[rows] = x.sum(1) if weight is None else x @ weight

        # One fused pass (max, Σ exp, normalise) writes the softmax, and the log-sum-exp follows from it.
        torch._softmax(x, 1, False, out=work)
        lse = self._lse_(x if survives else None, row_max, work, rows)

        scale = self.scale[rows]
        if self.soft:
            coefficient = self.mass[rows]
        else:
            u = self.target_logit[rows] - lse  # log p_y
            hard = -self.main_weight[rows] * options.term.derivative(u, options.label_smoothing, self.num_classes)
            coefficient = hard + self.valid[rows] * (options.label_smoothing / self.num_classes * self.total_weight)
        if options.z_loss:
            z_weight = 1.0 if self.soft else self.target_weight[rows]
            coefficient = coefficient + 2.0 * options.z_loss * z_weight * lse
        work.mul_((coefficient * scale).unsqueeze(1))
        if self.soft:
            work.sub_(weighted_probs * scale.unsqueeze(1))
        else:
            work.scatter_add_(1, self.safe_target[rows], -(hard * scale).unsqueeze(1))
            if options.label_smoothing:
                work.sub_(self.uniform[rows] if weight is None else self.uniform[rows] * weight)
        if options.logit_scale != 1.0:
            work.mul_(options.logit_scale)
        if capped is not None:
            work.mul_(capped.square_().neg_().add_(1.0))
        if not self.soft:
            self.ignored_rows.zero_(work, rows)
        if grad is not None and work is not grad:
            grad.copy_(work)

    def _lse_(
        self, x: torch.Tensor | None, row_max: torch.Tensor | None, probs: torch.Tensor, rows: slice
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
            target_prob = probs.gather(1, self.safe_target[rows]).squeeze(1)
            lse = self.target_logit[rows] - torch.log(target_prob)
            tiny = (target_prob < TINY_PROBABILITY).logical_and_(self.kept[rows]).nonzero().squeeze(1)
            if tiny.numel():
                maxima = row_max[tiny] if row_max is not None else cast(torch.Tensor, x)[tiny].amax(dim=1)
                lse[tiny] = maxima - torch.log(probs[tiny].amax(dim=1))
        self.lse[rows] = lse
        return lse

    def losses(self) -> torch.Tensor:
        """``(M,)`` losses, once every block has run."""
        lse = self.lse
        options = self.options
        if self.soft:
            loss = self.mass * lse - self.target_term
            z_weight: float | torch.Tensor = 1.0
        else:
            smoothing = options.label_smoothing
            u = self.target_logit - lse
            loss = self.main_weight * options.term.value(u, smoothing, self.num_classes)
            if smoothing:
                # PyTorch's uniform part: (ε/C) Σ_c w_c (lse - z_c), weighted class by class.
                loss = loss + self.valid * (smoothing / self.num_classes) * (
                    self.total_weight * lse - self.smooth_logit
                )
            z_weight = self.target_weight
        if options.z_loss:
            loss = loss + options.z_loss * z_weight * lse.square()
        if not self.soft:  # an ignored row's terms are 0 · ψ(u) and the like: NaN when its logits hold NaN or ±inf
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


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy on canonical logits with the gradient formed in the forward pass (see the module docstring)
    by a row kernel: :func:`loss_and_grad_` on any device, or the Triton kernel on GPUs. ``weight`` is
    ``options.weight``, passed apart so that autograd sees it."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        options: RowLoss,
        reduction: str,
        inplace_backward: bool,
        allow_retain_graph: bool,
        kernel: RowKernel,
    ) -> torch.Tensor:
        dtype = accumulation_dtype(logits.dtype)
        scale = torch.ones((), dtype=dtype, device=logits.device)
        if reduction == "mean":
            scale = safe_divide(scale, mean_denominator(target, options, dtype))
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        losses = kernel(logits, grad, target, options, scale.expand(logits.shape[0]))
        ctx.options, ctx.reduction, ctx.allow_retain_graph = options, reduction, allow_retain_graph
        ctx.grad = grad  # kept on ctx, not saved: with inplace_backward it is the logits, changed on purpose
        if any(ctx.needs_input_grad[1:3]):  # inplace_backward was refused for this case up front
            ctx.save_for_backward(logits, target, weight)
        if reduction == "none":
            return losses
        return losses.sum() * scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        refuse_second_order()
        grad_target = grad_weight = None
        if any(ctx.needs_input_grad[1:3]):
            logits, target, weight = ctx.saved_tensors

            def reference(target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
                options = dataclasses.replace(ctx.options, weight=weight)
                return reference_cross_entropy(logits, target, options, ctx.reduction)

            grad_target, grad_weight = reference_gradients(
                reference, (target, weight), ctx.needs_input_grad[1:3], grad_output
            )
        unused = (None,) * 5
        if not ctx.needs_input_grad[0]:
            return None, grad_target, grad_weight, *unused
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "the chunked cross_entropy scales its stored gradient in place, so it can be backpropagated once; "
                "use impl='reference' to backpropagate through the graph twice"
            )
        scale = grad_output.unsqueeze(1) if ctx.reduction == "none" else grad_output
        if ctx.allow_retain_graph:  # keep the stored gradient intact: one more logits-sized buffer
            return grad * scale.to(grad.dtype), grad_target, grad_weight, *unused
        ctx.grad = None
        scale_(grad, scale)
        return grad, grad_target, grad_weight, *unused


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


def chunked_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    options: RowLoss,
    reduction: str,
    *,
    inplace_backward: bool = False,
    allow_retain_graph: bool = False,
    kernel: RowKernel | None = None,
) -> torch.Tensor:
    """Cross-entropy of canonical logits ``(M, C)`` by :class:`ChunkedCrossEntropy`, already reduced; ``kernel``
    defaults to :func:`loss_and_grad_`.

    By default backward scales the stored gradient in place and returns it — no second logits-sized buffer — so
    the graph can be backpropagated once. ``allow_retain_graph=True`` keeps it intact for repeated backward
    passes (``retain_graph=True``, ``gradcheck``) at the cost of that buffer.
    """
    if (
        inplace_backward
        and torch.is_grad_enabled()
        and any(tensor is not None and tensor.requires_grad for tensor in (target, options.weight))
    ):
        raise ValueError(
            "inplace_backward=True overwrites the logits, which the gradient of a target or weight that requires "
            "grad is computed from; detach them or leave inplace_backward off"
        )
    if not logits.is_contiguous():
        logits = logits.contiguous()
    return cast(
        torch.Tensor,
        ChunkedCrossEntropy.apply(
            logits,
            target,
            options.weight,
            options,
            reduction,
            inplace_backward,
            allow_retain_graph,
            kernel or loss_and_grad_,
        ),
    )
