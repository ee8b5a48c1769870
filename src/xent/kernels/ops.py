"""The fused kernels as ``torch.library`` custom operators: what ``torch.compile`` and ``torch.library.opcheck`` see.

The operators, each with its fake implementation and registered autograd:

- ``xent::row_loss``: logits ``(M, C)`` → the loss and its gradient ``(M, C)``, formed in the forward pass (every
  fused row loss: cross-entropy and its family);
- ``xent::linear_row_loss``: ``input (N, D)`` and a head ``(V, D)`` → the loss and the gradients of the input, the
  weight and the bias; ``xent::linear_row_loss_backward`` forms them for ``reduction="none"``;
- ``xent::linear_log_probs`` (and its backward): each token's log-probability and statistics of a head;
- ``xent::linear_distillation`` (and its backward): the distillation loss of a student head against a teacher's head
  or top-k;
- ``xent::scale_``: a stored gradient scaled in place by ``grad_output``.

An operator's arguments are tensors and numbers only — the ``RowLoss`` description is
flattened into them (``row_arguments``) and rebuilt inside — so a compiled graph holds the call as one opaque
node: Dynamo traces the fake implementation (shapes and dtypes, no data), and the kernel runs at run time as it
does eagerly, threads, host reads and Triton launches included. The gradient the forward formed is an output the
registered backward multiplies by ``grad_output``, out of place while traced (a caller may keep that output). xent
itself calls the operators through small autograd Functions that keep the gradients inside their node, so their
backward scales them in place, eagerly and compiled (the operator ``xent::scale_``, which Inductor runs on the
stored buffer and which skips the pass for ``loss.backward()``'s factor 1): a compiled ``xent.cross_entropy`` takes
eager's time. Eager calls go through the same operators, so the whole test grid runs them.

What the operators do not do, the callers keep out: gradients of probability targets and class weights come from
the reference, recomputed in an eager backward (``xent.kernels.chunked.reference_gradients``); a compiled call
that needs them is given the reference implementation instead (``xent.kernels.dispatch.choose``).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from xent._config import value_checks_deferred
from xent.core.reduce import accumulation_dtype, safe_divide
from xent.core.reference import reference_linear_loss, reference_loss
from xent.core.rowloss import TERMS, RowLoss, make_term, mean_denominator
from xent.core.values import check_class_indices
from xent.kernels import buffers, chunked, distill, logprobs
from xent.kernels import linear as chunked_linear

# RowLoss's tensors, in the operators' order after the target
OPTION_TENSORS = ("weight", "alpha", "token_weight", "class_offset", "target_margin")


def row_arguments(options: RowLoss) -> tuple[Any, ...]:
    """A description as the operators take it: its five tensors, then ignore_index, label_smoothing, z_loss,
    softcap, logit_scale, the term's name and its parameters. The term crosses as its name, so it must be one of
    :data:`xent.core.rowloss.TERMS` — an unregistered one would come back as another."""
    term = options.term
    if TERMS.get(term.name) is not type(term):
        raise TypeError(
            f"the target term {type(term).__name__} (name {term.name!r}) is not in xent.core.rowloss.TERMS: give it "
            "a name of its own and its PARAMETERS, and add it there, for the fused kernels to rebuild it"
        )
    return (
        *(getattr(options, name) for name in OPTION_TENSORS),
        options.ignore_index,
        options.label_smoothing,
        options.z_loss,
        options.softcap,
        options.logit_scale,
        options.term.name,
        options.term.parameters(),
    )


def _options(
    weight: Tensor | None,
    alpha: Tensor | None,
    token_weight: Tensor | None,
    class_offset: Tensor | None,
    target_margin: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    term: str,
    term_parameters: list[float],
) -> RowLoss:
    return RowLoss(
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        term=make_term(term, term_parameters),
        alpha=alpha,
        token_weight=token_weight,
        class_offset=class_offset,
        target_margin=target_margin,
        logit_scale=logit_scale,
    )


def _row_kernel(impl: str, device: torch.device) -> chunked.RowKernel:
    if impl == "triton":
        from xent.kernels.triton import row_loss

        return row_loss.loss_and_grad_
    return chunked.loss_and_grad_


def _scale(dtype: torch.dtype, device: torch.device, target: Tensor, options: RowLoss, reduction: str) -> Tensor:
    """The factor of every row's gradient: 1, or 1 / what ``"mean"`` divides by."""
    scale = torch.ones((), dtype=dtype, device=device)
    if reduction == "mean":
        scale = safe_divide(scale, mean_denominator(target, options, dtype))
    return scale


def _reduced_shape(rows: int, reduction: str) -> tuple[int, ...]:
    return (rows,) if reduction == "none" else ()


@torch.library.custom_op("xent::scale_", mutates_args=("grad",))
def scale_(grad: Tensor, factor: Tensor) -> None:
    """``grad *= factor`` in place, skipped when ``factor`` is a scalar exactly 1 that can be read without a device
    sync (:func:`xent.kernels.chunked.scale_`)."""
    chunked.scale_(grad, factor)


@scale_.register_fake
def _(grad: Tensor, factor: Tensor) -> None:
    return None


def _traced(tensor: Tensor) -> bool:
    """Whether a tensor is being traced: by Dynamo (which shows a plain tensor type) or by AOTAutograd (a
    functional or fake tensor)."""
    return torch.compiler.is_compiling() or type(tensor) is not torch.Tensor


def _scaled(ctx: Any, grad: Tensor, factor: Tensor) -> Tensor:
    """``grad · factor`` for a backward. In place when the gradient never left its node (``ctx.owned``: xent's
    own calls) and is not kept for another backward (``ctx.retain``) — eagerly, or traced through the operator
    :func:`scale_` — after which the node refuses a second backward; out of place otherwise (a caller of the
    operator may hold the gradient output)."""
    if ctx.retain or not getattr(ctx, "owned", False):
        return grad * factor.to(grad.dtype)
    if _traced(grad):
        scale_(grad, factor)
    else:
        chunked.scale_(grad, factor)
    ctx.scaled = True
    return grad


def _keep_gradients(ctx: Any, gradients: tuple[Tensor, ...], others: tuple[Tensor | None, ...] = ()) -> None:
    """Keep the gradients the forward formed for the backward, and ``others``. Eagerly they stay on ``ctx`` as
    they are, as the eager kernels always kept them: saved-tensor hooks (activation offloading to the host, say)
    leave them alone. Traced, they are saved, the only way a graph hands tensors to its backward."""
    ctx.gradients_saved = any(_traced(gradient) for gradient in gradients)
    ctx.num_gradients = len(gradients)
    if ctx.gradients_saved:
        ctx.save_for_backward(*gradients, *others)
    else:
        ctx.gradients = gradients
        ctx.save_for_backward(*others)


def _kept_gradients(ctx: Any) -> tuple[tuple[Tensor, ...], tuple[Any, ...]]:
    """``(gradients, others)`` as :func:`_keep_gradients` kept them. Eagerly, a node that scales its gradients in
    place (xent's own, not kept for another backward) lets go of them here."""
    saved = ctx.saved_tensors
    if ctx.gradients_saved:
        return saved[: ctx.num_gradients], saved[ctx.num_gradients :]
    gradients = ctx.gradients
    if ctx.owned and not ctx.retain:
        ctx.gradients = None
    return gradients, saved


def _refuse_second_backward(ctx: Any) -> None:
    """A stored gradient scaled in place by a first backward is no longer the gradient: refuse to reuse it."""
    if getattr(ctx, "scaled", False):
        raise RuntimeError(
            "xent's fused kernels scale their stored gradient in place, so a graph through them can be "
            "backpropagated once; use impl='reference' to backpropagate through the graph twice"
        )


def _check(target: Tensor) -> bool:
    """Whether the operator checks the class indices itself: when a compiled caller asks for the check (the rule
    of :mod:`xent._config`); an eager caller has checked them already."""
    return value_checks_deferred(target)


def _empty(like: Tensor) -> Tensor:
    """The placeholder of a gradient nobody asked for (operators return tensors, not None)."""
    return like.new_empty(0)


# --- logits -----------------------------------------------------------------------------------------------------


@torch.library.custom_op("xent::row_loss", mutates_args=())
def row_loss(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    alpha: Tensor | None,
    token_weight: Tensor | None,
    class_offset: Tensor | None,
    target_margin: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    term: str,
    term_parameters: list[float],
    reduction: str,
    impl: str,
    needs_grad: bool,
    retain: bool,
    check_target: bool,
) -> tuple[Tensor, Tensor]:
    """The loss of canonical logits (reduced, or ``(M,)``) in the accumulation dtype, and when ``needs_grad`` its
    gradient for ``grad_output = 1`` (else an empty tensor). ``retain``: the backward leaves it intact;
    ``check_target``: check the class indices here (a compiled caller could not)."""
    if check_target and not target.is_floating_point():
        check_class_indices(target, logits.shape[1], ignore_index)
    options = _options(
        weight, alpha, token_weight, class_offset, target_margin, ignore_index, label_smoothing, z_loss, softcap,
        logit_scale, term, term_parameters,
    )  # fmt: skip
    scale = _scale(accumulation_dtype(logits.dtype), logits.device, target, options, reduction)
    grad = buffers.empty(tuple(logits.shape), logits.dtype, logits.device) if needs_grad else None
    losses = _row_kernel(impl, logits.device)(logits, grad, target, options, scale.expand(logits.shape[0]))
    loss = losses if reduction == "none" else losses.sum() * scale
    return loss, _empty(logits) if grad is None else grad


@row_loss.register_fake
def _(logits: Tensor, target: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    reduction, _, needs_grad, _, _ = args[-5:]
    loss = logits.new_empty(_reduced_shape(logits.shape[0], reduction), dtype=accumulation_dtype(logits.dtype))
    return loss, torch.empty_like(logits, memory_format=torch.contiguous_format) if needs_grad else _empty(logits)


def _row_loss_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor], owned: bool = False) -> None:
    ctx.reduction, ctx.retain, ctx.owned = inputs[-5], inputs[-2], owned
    ctx.scalars = inputs[7:-5]  # ignore_index … term_parameters
    ctx.extra = any(ctx.needs_input_grad[1:3])  # the target's or the class weight's gradient, from the reference
    _keep_gradients(ctx, output[1:], inputs[:7] if ctx.extra else ())
    ctx.set_materialize_grads(False)  # no zeros of the gradient's shape for its (absent) grad_output
    if not owned:
        ctx.mark_non_differentiable(output[1])  # the gradient is an output of the operator, not differentiated


def _row_loss_backward(ctx: Any, grad_output: Tensor | None, _: Tensor | None) -> tuple[Tensor | None, ...]:
    if grad_output is None:  # the loss took no part in what is differentiated
        return (None,) * 19
    chunked.refuse_second_order()
    _refuse_second_backward(ctx)
    (grad,), saved = _kept_gradients(ctx)
    grad_target = grad_weight = None
    if ctx.extra:
        logits, target, weight, *option_tensors = saved

        def reference(target: Tensor, weight: Tensor | None) -> Tensor:
            return reference_loss(logits, target, _options(weight, *option_tensors, *ctx.scalars), ctx.reduction)

        grad_target, grad_weight = chunked.reference_gradients(
            reference, (target, weight), ctx.needs_input_grad[1:3], grad_output
        )
    grad_logits = None
    if ctx.needs_input_grad[0]:
        if grad.dim() != 2:
            raise RuntimeError("xent::row_loss was called with needs_grad=False on logits that require grad")
        grad_logits = _scaled(ctx, grad, grad_output.unsqueeze(1) if ctx.reduction == "none" else grad_output)
    return grad_logits, grad_target, grad_weight, *(None,) * 16


row_loss.register_autograd(_row_loss_backward, setup_context=_row_loss_setup)


class _RowLossOwningItsGradient(torch.autograd.Function):
    """:func:`row_loss` as xent calls it: the same operator, setup and backward, but the gradient output never
    leaves this node, so its backward may scale it in place even while traced (the operator :func:`scale_`),
    which Inductor runs on the stored buffer and which skips the pass for ``loss.backward()``'s factor 1 — as eager
    does. The operator's own registered backward cannot: a caller of the operator may keep its gradient output."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        loss, grad = row_loss(*inputs)
        _row_loss_setup(ctx, inputs, (loss, grad), owned=True)
        return cast(Tensor, loss)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None) -> tuple[Tensor | None, ...]:
        return _row_loss_backward(ctx, grad_output, None)


def fused_row_loss(
    logits: Tensor, target: Tensor, options: RowLoss, reduction: str, impl: str, *, retain: bool = False
) -> Tensor:
    """The reduced loss of canonical logits by :func:`row_loss`; ``impl`` is ``"chunked"`` or ``"triton"``."""
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    loss = _RowLossOwningItsGradient.apply(  # type: ignore[no-untyped-call]  # forward takes the operator's *inputs
        logits.contiguous(), target, *row_arguments(options), reduction, impl, needs_grad, retain, _check(target)
    )  # fmt: skip
    return cast(Tensor, loss)


# --- a linear head ----------------------------------------------------------------------------------------------


def _linear_grads(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, needs: list[bool], weight_grad_dtype: torch.dtype
) -> chunked_linear._Grads:
    return chunked_linear.new_grads(input, linear_weight, linear_bias, tuple(needs), weight_grad_dtype)


def _kept(target: Tensor, ignore_index: int) -> Tensor | None:
    return None if target.is_floating_point() else target != ignore_index


def _placeholders(grads: chunked_linear._Grads, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return cast(tuple[Tensor, Tensor, Tensor], tuple(_empty(input) if grad is None else grad for grad in grads))


@torch.library.custom_op("xent::linear_row_loss", mutates_args=())
def linear_row_loss(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    alpha: Tensor | None,
    token_weight: Tensor | None,
    class_offset: Tensor | None,
    target_margin: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    term: str,
    term_parameters: list[float],
    reduction: str,
    impl: str,
    chunk_size: int,
    weight_grad_dtype: torch.dtype,
    needs: list[bool],
    retain: bool,
    check_target: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss of ``input @ linear_weight.T + linear_bias`` and, for ``"mean"``/``"sum"``, the gradients of
    ``input``, ``linear_weight``, ``linear_bias`` flagged in ``needs`` (each empty when not); for ``"none"`` the
    gradients wait for the backward (:func:`linear_row_loss_backward`). ``retain``, ``check_target``: as for
    :func:`row_loss`."""
    if check_target and not target.is_floating_point():
        check_class_indices(target, linear_weight.shape[0], ignore_index)
    options = _options(
        weight, alpha, token_weight, class_offset, target_margin, ignore_index, label_smoothing, z_loss, softcap,
        logit_scale, term, term_parameters,
    )  # fmt: skip
    dtype = accumulation_dtype(input.dtype)
    chunk_loss = chunked_linear.row_kernel_loss(target, options, _row_kernel(impl, input.device))
    kept = _kept(target, ignore_index)
    ones = torch.ones(input.shape[0], dtype=dtype, device=input.device)
    if reduction == "none":
        losses = chunked_linear.fused_pass(
            input, linear_weight, linear_bias, chunk_loss, ones, chunk_size, (None,) * 3, kept
        )  # fmt: skip
        return losses, _empty(input), _empty(input), _empty(input)
    scale = _scale(dtype, input.device, target, options, reduction)
    grads = _linear_grads(input, linear_weight, linear_bias, needs, weight_grad_dtype)
    losses = chunked_linear.fused_pass(
        input, linear_weight, linear_bias, chunk_loss, scale.expand_as(ones), chunk_size, grads, kept
    )  # fmt: skip
    grads = chunked_linear.cast_grads(grads, input, linear_weight, linear_bias)
    return losses.sum() * scale, *_placeholders(grads, input)


def _fake_linear_grads(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, needs: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    needs_input, needs_weight, needs_bias = needs
    return (
        torch.empty_like(input) if needs_input else _empty(input),
        # new buffers, contiguous whatever the strides of the weight (a transposed one, say)
        linear_weight.new_empty(linear_weight.shape) if needs_weight else _empty(input),
        linear_bias.new_empty(linear_bias.shape) if needs_bias and linear_bias is not None else _empty(input),
    )


@linear_row_loss.register_fake
def _(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, *args: Any) -> tuple[Tensor, ...]:
    reduction, needs = args[-7], args[-3]
    loss = input.new_empty(_reduced_shape(input.shape[0], reduction), dtype=accumulation_dtype(input.dtype))
    if reduction == "none":
        return loss, _empty(input), _empty(input), _empty(input)
    return loss, *_fake_linear_grads(input, linear_weight, linear_bias, needs)


@torch.library.custom_op("xent::linear_row_loss_backward", mutates_args=())
def linear_row_loss_backward(
    grad_output: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    alpha: Tensor | None,
    token_weight: Tensor | None,
    class_offset: Tensor | None,
    target_margin: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    term: str,
    term_parameters: list[float],
    impl: str,
    chunk_size: int,
    weight_grad_dtype: torch.dtype,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``reduction="none"``'s per-token losses contracted with ``grad_output (N,)``: the logits
    recomputed chunk by chunk with each token's factor applied before ``d weight`` sums over tokens."""
    options = _options(
        weight, alpha, token_weight, class_offset, target_margin, ignore_index, label_smoothing, z_loss, softcap,
        logit_scale, term, term_parameters,
    )  # fmt: skip
    chunk_loss = chunked_linear.row_kernel_loss(target, options, _row_kernel(impl, input.device))
    grads = _linear_grads(input, linear_weight, linear_bias, needs, weight_grad_dtype)
    scale = grad_output.to(accumulation_dtype(input.dtype))
    chunked_linear.fused_pass(
        input, linear_weight, linear_bias, chunk_loss, scale, chunk_size, grads, _kept(target, ignore_index)
    )  # fmt: skip
    return _placeholders(chunked_linear.cast_grads(grads, input, linear_weight, linear_bias), input)


@linear_row_loss_backward.register_fake
def _(grad_output: Tensor, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, *args: Any) -> Any:
    return _fake_linear_grads(input, linear_weight, linear_bias, args[-1])


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...], owned: bool = False) -> None:
    ctx.scalars = inputs[9:16]  # ignore_index … term_parameters
    ctx.reduction, ctx.run, ctx.retain = inputs[16], inputs[17:20], inputs[21]  # run: impl, chunk_size, dtype
    ctx.owned = owned
    ctx.extra = any(ctx.needs_input_grad[3:5])  # the target's or the class weight's gradient, from the reference
    tensors = inputs[:9] if ctx.reduction == "none" or ctx.extra else ()  # input, W, b, target, the description's
    _keep_gradients(ctx, output[1:4], tensors)
    ctx.set_materialize_grads(False)  # no zeros of the gradients' shapes for their (absent) grad_outputs
    if not owned:
        ctx.mark_non_differentiable(*output[1:4])  # outputs of the operator, not differentiated


def _linear_backward(ctx: Any, grad_output: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:
    if grad_output is None:  # the loss took no part in what is differentiated
        return (None,) * 23
    chunked.refuse_second_order()
    _refuse_second_backward(ctx)
    grads, tensors = _kept_gradients(ctx)
    grad_target = grad_weight = None
    if ctx.extra:
        input, linear_weight, linear_bias, target, weight, *option_tensors = tensors

        def reference(target: Tensor, weight: Tensor | None) -> Tensor:
            options = _options(weight, *option_tensors, *ctx.scalars)
            return reference_linear_loss(input, linear_weight, linear_bias, target, options, ctx.reduction)

        grad_target, grad_weight = chunked.reference_gradients(
            reference, (target, weight), ctx.needs_input_grad[3:5], grad_output
        )
    needs = [bool(need) for need in ctx.needs_input_grad[:3]]
    if ctx.reduction == "none":
        grads = linear_row_loss_backward(grad_output, *tensors, *ctx.scalars, *ctx.run, needs)
    else:
        grads = tuple(
            _scaled(ctx, grad, grad_output) if need else grad for grad, need in zip(grads, needs, strict=True)
        )
    head = tuple(grad if need else None for grad, need in zip(grads, needs, strict=True))
    return *head, grad_target, grad_weight, *(None,) * 18


linear_row_loss.register_autograd(_linear_backward, setup_context=_linear_setup)


class _LinearRowLossOwningItsGradients(torch.autograd.Function):
    """:func:`linear_row_loss` as xent calls it, its gradient outputs never leaving the node: see
    :class:`_RowLossOwningItsGradient`."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        output = linear_row_loss(*inputs)
        _linear_setup(ctx, inputs, output, owned=True)
        return cast(Tensor, output[0])

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None) -> tuple[Tensor | None, ...]:
        return _linear_backward(ctx, grad_output)


def fused_linear_row_loss(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    options: RowLoss,
    reduction: str,
    impl: str,
    *,
    chunk_size: int | None = None,
    weight_grad_dtype: torch.dtype | None = None,
    retain: bool = False,
) -> Tensor:
    """The reduced linear loss of canonical tensors (``input (N, D)``) by :func:`linear_row_loss`."""
    grad_enabled = torch.is_grad_enabled()
    needs = [
        grad_enabled and tensor is not None and tensor.requires_grad for tensor in (input, linear_weight, linear_bias)
    ]
    chunk_size = chunk_size or chunked_linear.default_chunk_size(
        input.shape[0], linear_weight.shape[0], input.device, input.element_size()
    )
    loss = _LinearRowLossOwningItsGradients.apply(  # type: ignore[no-untyped-call]  # forward takes *inputs
        input.contiguous(), linear_weight, linear_bias, target, *row_arguments(options), reduction, impl,
        chunk_size, weight_grad_dtype or linear_weight.dtype, needs, retain, _check(target),
    )  # fmt: skip
    return cast(Tensor, loss)


# --- per-token log-probabilities of a linear head ----------------------------------------------------------------


@torch.library.custom_op("xent::linear_log_probs", mutates_args=())
def linear_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    scale: float,
    softcap: float | None,
    ignore_index: int,
    chunk_size: int,
    statistics: list[bool],
    check_target: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Each token's ``log p_y`` and the statistics flagged in ``statistics`` (in :data:`~xent.kernels.logprobs.
    STATISTICS` order; empty when not), then two internal outputs for the backward: the log-sum-exps and a copy of
    the entropy (the caller may change its outputs in place). ``check_target``: as for :func:`row_loss`."""
    if check_target:
        check_class_indices(target, linear_weight.shape[0], ignore_index)
    names = frozenset(name for name, wanted in zip(logprobs.STATISTICS, statistics, strict=True) if wanted)
    rows, lse = logprobs.linear_log_probs_forward(
        input, linear_weight, linear_bias, target, logprobs.HeadTransform(scale, softcap), ignore_index, chunk_size,
        names,
    )  # fmt: skip
    outputs = [_empty(input) if value is None else value for value in rows[1:]]
    entropy = rows.entropy
    return rows.log_probs, *outputs, lse, _empty(input) if entropy is None else entropy.clone()  # type: ignore[return-value]


@linear_log_probs.register_fake
def _(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, *args: Any) -> Any:
    statistics = args[-2]
    dtype = accumulation_dtype(input.dtype)
    rows = input.new_empty(input.shape[0], dtype=dtype)

    def output(name: str, wanted: bool) -> Tensor:
        if not wanted:
            return _empty(input)
        return torch.empty_like(rows, dtype=torch.bool if name == "is_top1" else dtype)

    outputs = [output(name, wanted) for name, wanted in zip(logprobs.STATISTICS, statistics, strict=True)]
    return rows, *outputs, torch.empty_like(rows), torch.empty_like(outputs[0])


@torch.library.custom_op("xent::linear_log_probs_backward", mutates_args=())
def linear_log_probs_backward(
    grad_log_probs: Tensor | None,
    grad_entropy: Tensor | None,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    scale: float,
    softcap: float | None,
    ignore_index: int,
    chunk_size: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients flagged in ``needs`` of ``Σ grad_log_probs · log p_y + grad_entropy · H`` (either may be None),
    the logits recomputed chunk by chunk."""
    grads = logprobs.linear_log_probs_gradients(
        grad_log_probs, grad_entropy, input, linear_weight, linear_bias, target, lse, entropy,
        logprobs.HeadTransform(scale, softcap), ignore_index, chunk_size, tuple(needs),
    )  # fmt: skip
    return _placeholders(grads, input)


@linear_log_probs_backward.register_fake
def _(grad_log_probs: Tensor | None, grad_entropy: Tensor | None, input: Tensor, linear_weight: Tensor,
      linear_bias: Tensor | None, *args: Any) -> Any:  # fmt: skip
    return _fake_linear_grads(input, linear_weight, linear_bias, args[-1])


def _log_probs_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.set_materialize_grads(False)  # an unused output's grad_output arrives as None
    input, linear_weight, linear_bias, target = inputs[:4]
    ctx.scalars = inputs[4:8]  # scale, softcap, ignore_index, chunk_size
    ctx.has_entropy = inputs[8][0]
    lse, entropy = output[-2:]
    ctx.save_for_backward(input, linear_weight, linear_bias, target, lse, entropy if ctx.has_entropy else None)
    ctx.mark_non_differentiable(*output[2:])  # the statistics besides the entropy have no gradient


def _log_probs_backward(ctx: Any, grad_log_probs: Tensor | None, grad_entropy: Tensor | None, *_: Any) -> Any:
    if torch.is_grad_enabled():
        raise RuntimeError(logprobs.SECOND_ORDER_MESSAGE)
    none = (None,) * 10
    needs = [bool(need) for need in ctx.needs_input_grad[:3]]
    if not ctx.has_entropy:
        grad_entropy = None
    if (grad_log_probs is None and grad_entropy is None) or not any(needs):
        return none
    input, linear_weight, linear_bias, target, lse, entropy = ctx.saved_tensors
    grads = linear_log_probs_backward(
        grad_log_probs, grad_entropy, input, linear_weight, linear_bias, target, lse, entropy, *ctx.scalars, needs
    )  # fmt: skip
    return *(grad if need else None for grad, need in zip(grads, needs, strict=True)), *none[3:]


linear_log_probs.register_autograd(_log_probs_backward, setup_context=_log_probs_setup)


def fused_linear_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    transform: logprobs.HeadTransform,
    ignore_index: int,
    chunk_size: int | None = None,
    statistics: frozenset[str] = frozenset({"entropy"}),
) -> logprobs.RowOutputs:
    """The outputs of canonical tensors (``input (N, D)``, ``target (N,)``) by :func:`linear_log_probs`, each
    ``(N,)`` in the accumulation dtype (``is_top1`` bool), those not in ``statistics`` None; ``chunk_size`` defaults
    to :func:`xent.kernels.linear.default_chunk_size`."""
    unknown = statistics - set(logprobs.STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; expected some of {logprobs.STATISTICS}")
    chunk_size = chunk_size or chunked_linear.default_chunk_size(
        input.shape[0], linear_weight.shape[0], input.device, input.element_size()
    )
    wanted = [name in statistics for name in logprobs.STATISTICS]
    results = linear_log_probs(
        input.contiguous(), linear_weight, linear_bias, target, transform.scale, transform.softcap, ignore_index,
        chunk_size, wanted, _check(target),
    )  # fmt: skip
    outputs = (value if want else None for value, want in zip(results[1:5], wanted, strict=True))
    return logprobs.RowOutputs(results[0], *outputs)


# --- distillation on a linear head -------------------------------------------------------------------------------


def _distill_kernels(impl: str) -> tuple[distill.RowsKernel, distill.RowsKernel]:
    if impl == "triton":
        from xent.kernels.triton import divergence as triton_divergence

        return triton_divergence.dense_rows_, triton_divergence.top_k_rows_
    return distill.dense_rows_, distill.top_k_rows_


def _distill_chunk_loss(
    teacher_tensors: tuple[Tensor | None, ...],
    kept: Tensor,
    factor: Tensor,
    hard_target: Tensor | None,
    hard_weight: Tensor | None,
    spec: tuple[Any, ...],
    impl: str,
    entropy: Tensor | None,
) -> chunked_linear.ChunkLoss:
    """The distillation chunk loss of an operator's arguments: a dense teacher when its head is given, else its
    top-k."""
    teacher_input, teacher_weight, teacher_bias, indices, categories, valid = teacher_tensors
    teacher: distill.DenseTeacher | distill.TopKTeacher
    if teacher_input is not None and teacher_weight is not None:
        teacher = distill.DenseTeacher(teacher_input, teacher_weight, teacher_bias)
    else:
        teacher = distill.TopKTeacher(*cast(tuple[Tensor, Tensor, Tensor], (indices, categories, valid)))
    hard = None if hard_target is None else distill.HardLabels(hard_target, cast(Tensor, hard_weight))
    return distill.distillation_chunk_loss(
        teacher, distill.DistillSpec(*spec), factor, kept, hard, entropy, _distill_kernels(impl)
    )  # fmt: skip


@torch.library.custom_op("xent::linear_distillation", mutates_args=())
def linear_distillation(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    teacher_input: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_indices: Tensor | None,
    teacher_categories: Tensor | None,
    teacher_valid: Tensor | None,
    kept: Tensor,
    factor: Tensor,
    hard_target: Tensor | None,
    hard_weight: Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    logit_scale: float,
    softcap: float | None,
    teacher_logit_scale: float,
    teacher_softcap: float | None,
    tail: str,
    finite_logits: bool,
    reduction: str,
    impl: str,
    chunk_size: int,
    with_entropy: bool,
    needs: list[bool],
    check_target: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The distillation loss of the student head ``input @ linear_weight.T + linear_bias`` against a teacher given
    by its head (``teacher_input``, ``teacher_weight``, ``teacher_bias``) or its top-k (``teacher_indices``,
    ``teacher_categories``, ``teacher_valid``), each kept token's loss times ``factor`` (the
    :class:`~xent.kernels.distill.DistillSpec` is the nine arguments after ``hard_weight``): summed (``"sum"``) with
    the student's gradients flagged in ``needs``, or per token (``"none"``, gradients in the backward); and the
    student's entropy per token when ``with_entropy`` (empty otherwise). ``check_target``: as for :func:`row_loss`,
    of the hard labels (the kept tokens' targets)."""
    if check_target and hard_target is not None:
        check_class_indices(hard_target, linear_weight.shape[0], -100)  # ignored tokens hold 0 there
    spec = (divergence, beta, temperature, logit_scale, softcap, teacher_logit_scale, teacher_softcap, tail,
            finite_logits)  # fmt: skip
    teacher = (teacher_input, teacher_weight, teacher_bias, teacher_indices, teacher_categories, teacher_valid)
    dtype = accumulation_dtype(input.dtype)
    entropy = torch.zeros(input.shape[0], dtype=dtype, device=input.device) if with_entropy else _empty(input)
    chunk_loss = _distill_chunk_loss(
        teacher, kept, factor, hard_target, hard_weight, spec, impl, entropy if with_entropy else None
    )  # fmt: skip
    ones = torch.ones(input.shape[0], dtype=dtype, device=input.device)
    if reduction == "none":
        losses = chunked_linear.fused_pass(input, linear_weight, linear_bias, chunk_loss, ones, chunk_size, (None,) * 3,
                                           kept)  # fmt: skip
        return losses, entropy, _empty(input), _empty(input), _empty(input)
    grads = _linear_grads(input, linear_weight, linear_bias, needs, linear_weight.dtype)
    losses = chunked_linear.fused_pass(input, linear_weight, linear_bias, chunk_loss, ones, chunk_size, grads, kept)
    grads = chunked_linear.cast_grads(grads, input, linear_weight, linear_bias)
    return losses.sum(), entropy, *_placeholders(grads, input)


@linear_distillation.register_fake
def _(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, *args: Any) -> Any:
    reduction, with_entropy, needs = args[19], args[22], args[23]  # check_target last
    dtype = accumulation_dtype(input.dtype)
    loss = input.new_empty(_reduced_shape(input.shape[0], reduction), dtype=dtype)
    entropy = input.new_empty(input.shape[0], dtype=dtype) if with_entropy else _empty(input)
    if reduction == "none":
        return loss, entropy, _empty(input), _empty(input), _empty(input)
    return loss, entropy, *_fake_linear_grads(input, linear_weight, linear_bias, needs)


@torch.library.custom_op("xent::linear_distillation_backward", mutates_args=())
def linear_distillation_backward(
    grad_output: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    teacher_input: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_indices: Tensor | None,
    teacher_categories: Tensor | None,
    teacher_valid: Tensor | None,
    kept: Tensor,
    factor: Tensor,
    hard_target: Tensor | None,
    hard_weight: Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    logit_scale: float,
    softcap: float | None,
    teacher_logit_scale: float,
    teacher_softcap: float | None,
    tail: str,
    finite_logits: bool,
    impl: str,
    chunk_size: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """The student's gradients of ``reduction="none"``'s per-token losses contracted with ``grad_output (N,)``."""
    spec = (divergence, beta, temperature, logit_scale, softcap, teacher_logit_scale, teacher_softcap, tail,
            finite_logits)  # fmt: skip
    teacher = (teacher_input, teacher_weight, teacher_bias, teacher_indices, teacher_categories, teacher_valid)
    chunk_loss = _distill_chunk_loss(teacher, kept, factor, hard_target, hard_weight, spec, impl, None)
    grads = _linear_grads(input, linear_weight, linear_bias, needs, linear_weight.dtype)
    scale = grad_output.to(accumulation_dtype(input.dtype))
    chunked_linear.fused_pass(input, linear_weight, linear_bias, chunk_loss, scale, chunk_size, grads, kept)
    return _placeholders(chunked_linear.cast_grads(grads, input, linear_weight, linear_bias), input)


@linear_distillation_backward.register_fake
def _(grad_output: Tensor, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, *args: Any) -> Any:
    return _fake_linear_grads(input, linear_weight, linear_bias, args[-1])


def _distill_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...], owned: bool = False) -> None:
    ctx.set_materialize_grads(False)  # the entropy and the gradients are outputs nobody differentiates
    ctx.mark_non_differentiable(*(output[1:2] if owned else output[1:]))  # owned: the gradients are no outputs
    ctx.reduction, ctx.retain, ctx.owned = inputs[22], False, owned
    ctx.scalars = (*inputs[13:22], *inputs[23:25])  # the spec's nine, impl, chunk_size
    tensors = inputs[:13] if ctx.reduction == "none" else ()
    _keep_gradients(ctx, output[2:5], tensors)


def _distill_backward(ctx: Any, grad_output: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:
    none = (None,) * 28
    if grad_output is None:
        return none
    chunked.refuse_second_order()
    _refuse_second_backward(ctx)
    stored, tensors = _kept_gradients(ctx)
    needs = [bool(need) for need in ctx.needs_input_grad[:3]]
    if ctx.reduction == "none":
        grads = linear_distillation_backward(grad_output, *tensors, *ctx.scalars, needs)
    else:
        grads = tuple(
            _scaled(ctx, grad, grad_output) if need else grad for grad, need in zip(stored, needs, strict=True)
        )
    return *(grad if need else None for grad, need in zip(grads, needs, strict=True)), *none[3:]


linear_distillation.register_autograd(_distill_backward, setup_context=_distill_setup)


class _LinearDistillationOwningItsGradients(torch.autograd.Function):
    """:func:`linear_distillation` as xent calls it, its gradient outputs never leaving the node (the loss and the
    entropy do): see :class:`_RowLossOwningItsGradient`."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor]:
        output = linear_distillation(*inputs)
        _distill_setup(ctx, inputs, output, owned=True)
        return output[0], output[1]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, _: Tensor | None) -> tuple[Tensor | None, ...]:
        return _distill_backward(ctx, grad_output)


def fused_linear_distillation(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    teacher: distill.DenseTeacher | distill.TopKTeacher,
    spec: distill.DistillSpec,
    factor: Tensor,
    kept: Tensor,
    hard: distill.HardLabels | None,
    reduction: str,
    impl: str,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """The summed (``"sum"``) or per-token (``"none"``) distillation loss of canonical tensors by
    :func:`linear_distillation`, and the student's entropy per token when ``with_entropy``."""
    grad_enabled = torch.is_grad_enabled()
    needs = [
        grad_enabled and tensor is not None and tensor.requires_grad for tensor in (input, linear_weight, linear_bias)
    ]
    teacher_tensors: tuple[Tensor | None, ...]
    if isinstance(teacher, distill.DenseTeacher):
        teacher_tensors = (teacher.input, teacher.weight, teacher.bias, None, None, None)
    else:
        teacher_tensors = (None, None, None, teacher.indices, teacher.categories, teacher.valid)
    loss, entropy = _LinearDistillationOwningItsGradients.apply(  # type: ignore[no-untyped-call]  # takes *inputs
        input.contiguous(), linear_weight, linear_bias, *teacher_tensors, kept, factor,
        None if hard is None else hard.target, None if hard is None else hard.weight,
        spec.divergence, spec.beta, spec.temperature, spec.logit_scale, spec.softcap, spec.teacher_logit_scale,
        spec.teacher_softcap, spec.tail, spec.finite_logits, reduction, impl, chunk_size, with_entropy, needs,
        hard is not None and value_checks_deferred(hard.target),
    )  # fmt: skip
    return loss, entropy if with_entropy else None
