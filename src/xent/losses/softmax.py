"""Softmax cross-entropy's public entry point, and the frame every index-target softmax loss shares.

A public function validates its arguments, brings every layout to a canonical one — logits ``(M, C)`` and either
class indices ``(M,)`` or probabilities ``(M, C)`` — builds the loss's description (:mod:`xent.core.rowloss`) and
hands it to the chosen implementation (:mod:`xent.kernels.dispatch`): a straight line, check → description →
implementation. Validation and reduction semantics are therefore shared by every implementation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from xent._config import values_checked
from xent.core.autocast import autocast_off, result_dtype
from xent.core.reduce import accumulation_dtype, reduce_loss
from xent.core.rowloss import RowLoss, mean_denominator
from xent.kernels import dispatch
from xent.kernels.dispatch import Impl, dispatch_logits_loss
from xent.losses import checks


def check_softmax_options(
    *, reduction: str, label_smoothing: float, z_loss: float, softcap: float | None, ignore_index: int
) -> tuple[float, float, float | None]:
    """Validate the scalar options of :func:`cross_entropy`; shared by the functional and the module."""
    checks.check_reduction(reduction)
    label_smoothing = checks.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = checks.check_in_range("z_loss", z_loss, 0.0)
    if softcap is not None:
        softcap = checks.check_in_range("softcap", softcap, 0.0, low_inclusive=False)
    checks.check_ignore_index(ignore_index)
    return label_smoothing, z_loss, softcap


def class_dimension(input: torch.Tensor, name: str = "input") -> int:
    """The class dimension of logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``, after checking them; errors
    call them ``name``, the caller's argument."""
    input = checks.check_floating(name, input)
    if input.dim() == 0:
        raise ValueError(f"{name} must have a class dimension: shape (C), (N, C) or (N, C, d1, ..., dK), got shape ()")
    class_dim = 0 if input.dim() == 1 else 1
    if input.shape[class_dim] == 0:
        raise ValueError(f"{name} has shape {checks.shape_str(input.shape)}: there must be at least one class")
    return class_dim


def canonicalize(
    input: torch.Tensor, target: torch.Tensor, name: str = "input"
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """Logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)`` → ``(M, C)``; targets → ``(M,)`` or ``(M, C)``.

    Returns the canonical logits, the canonical target and the batch shape (the input's shape without the class
    dimension), which is the shape of ``reduction="none"``'s result. Errors call the logits ``name``.
    """
    class_dim = class_dimension(input, name)
    target = checks.check_tensor("target", target)
    num_classes = input.shape[class_dim]
    batch_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    logits = input.movedim(class_dim, -1).reshape(-1, num_classes)
    if checks.is_probability_target(target, input_shape=input.shape, batch_shape=batch_shape, probs_shape=input.shape):
        return logits, target.movedim(class_dim, -1).reshape(-1, num_classes), batch_shape
    return logits, target.reshape(-1).long(), batch_shape  # any integer dtype (int8, uint8, int32, ...) is an index


def describe_cross_entropy(
    num_classes: int, *, label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None
) -> RowLoss:
    """The row-loss description of :func:`cross_entropy`'s own options, checked."""
    label_smoothing, z_loss, softcap = check_softmax_options(
        reduction="mean", label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, ignore_index=-100
    )
    return RowLoss(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


def checked_options(options: RowLoss, weight: torch.Tensor | None, target: torch.Tensor, num_classes: int) -> RowLoss:
    """``options`` with ``weight`` checked against ``num_classes``, after checking the class indices of ``target``
    (canonical, ``(M,)``) — the tensor checks shared by every softmax loss."""
    if target.is_floating_point():
        # Entries in [0, 1]; rows need not sum to 1 (PyTorch accepts any such row, and so do its own test inputs).
        checks.check_probabilities("target", target)
        # PyTorch's rule: a negative ignore_index (the default -100) is accepted and means nothing for probabilities.
        if options.ignore_index >= 0:
            raise ValueError(
                f"ignore_index={options.ignore_index} applies to class-index targets, but target holds probabilities; "
                "leave ignore_index at its default (give an ignored row zero probabilities or drop it instead)"
            )
    else:
        checks.check_class_indices(target, num_classes, options.ignore_index)
    return dataclasses.replace(options, weight=checks.check_class_weight("weight", weight, num_classes))


def check_token_weight(token_weight: torch.Tensor | None, batch_shape: torch.Size) -> torch.Tensor | None:
    """Per-token weights shaped like the target's batch shape, flattened to the canonical rows ``(M,)``."""
    if token_weight is None:
        return None
    token_weight = checks.check_floating("token_weight", token_weight)
    if token_weight.shape != batch_shape:
        raise ValueError(
            f"token_weight must have the target's shape {checks.shape_str(batch_shape)}, one weight per token, "
            f"got shape {checks.shape_str(token_weight.shape)}"
        )
    checks.check_non_negative("token_weight", token_weight)
    return token_weight.reshape(-1)


def class_index_loss(
    loss_name: str,
    input: torch.Tensor,
    target: torch.Tensor,
    row_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The shared frame of every softmax loss on class indices: validation, layout, ignore, weights, reduction.

    ``row_loss(log_probs, target)`` gets the log-softmax ``(M, C)`` in the accumulation dtype and class indices
    ``(M,)`` (ignored ones replaced by 0) and returns unweighted per-row losses ``(M,)``. The frame multiplies them by
    the target's class weight and the token weight, zeroes ignored rows and reduces exactly as
    :func:`cross_entropy` does.
    """
    checks.check_reduction_and_ignore_index(reduction, ignore_index)
    logits, target, batch_shape = canonicalize(input, target)
    if target.is_floating_point():
        raise TypeError(
            f"{loss_name} takes class indices as target, of shape {checks.shape_str(batch_shape)}, not probabilities"
        )
    num_classes = logits.shape[-1]
    options = RowLoss(
        weight=checks.check_class_weight("weight", weight, num_classes),
        ignore_index=ignore_index,
        token_weight=check_token_weight(token_weight, batch_shape),
    )
    checks.check_class_indices(target, num_classes, ignore_index)
    valid = target != ignore_index
    # an ignored row is absent whatever it holds: read as zeros, it cannot turn the loss or the gradient NaN
    logits = torch.where(valid.unsqueeze(-1), logits.to(accumulation_dtype(logits.dtype)), 0.0)
    log_probs = torch.log_softmax(logits, dim=-1)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    loss = row_loss(log_probs, safe_target)
    if options.weight is not None:
        loss = loss * options.weight.to(loss.dtype)[safe_target]
    if options.token_weight is not None:
        loss = loss * options.token_weight.to(loss.dtype)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    denominator = mean_denominator(target, options, loss.dtype) if reduction == "mean" else None
    return reduce_loss(loss.view(batch_shape), reduction, denominator).to(input.dtype)


def fused_index_loss(
    loss_name: str,
    input: torch.Tensor,
    target: torch.Tensor,
    readable: Callable[[], torch.Tensor],
    *,
    impl: Impl | None,
    reduction: str,
    weight: torch.Tensor | None,
    ignore_index: int,
    token_weight: torch.Tensor | None,
    description: RowLoss,
) -> torch.Tensor:
    """An index-target loss of the family by the chosen implementation: ``readable()`` — the loss's own plain
    definition — for ``impl="reference"``, else the fused kernels on its ``description`` (the loss's own options
    as its ``describe_*`` function builds them; the shared ones — ``weight``, ``ignore_index``, ``token_weight`` —
    are added here)."""
    checks.check_reduction_and_ignore_index(reduction, ignore_index)
    logits, flat_target, batch_shape = canonicalize(input, target)
    if flat_target.is_floating_point():
        raise TypeError(
            f"{loss_name} takes class indices as target, of shape {checks.shape_str(batch_shape)}, not probabilities"
        )
    options = dataclasses.replace(
        description, ignore_index=ignore_index, token_weight=check_token_weight(token_weight, batch_shape)
    )
    options = checked_options(options, weight, flat_target, logits.shape[-1])
    chosen = dispatch.choose("logits", impl, logits, flat_target, options, reduction=reduction)
    if chosen == "reference":
        with values_checked():  # the loss's own definition, of public losses: their value checks ran above
            return readable()
    with autocast_off(input):
        loss = dispatch.IMPLEMENTATIONS["logits", chosen](
            logits, flat_target, options, reduction, inplace_backward=False
        )
    return (loss.view(batch_shape) if reduction == "none" else loss).to(result_dtype(input))


def target_log_prob(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p_y per row: ``(M, C)``, ``(M,)`` → ``(M,)``."""
    return log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weight: torch.Tensor | None = None,
    impl: Impl | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    r"""Cross-entropy between logits and class indices or class probabilities.

    With class indices :math:`y_n`, class weights :math:`w` and label smoothing :math:`\varepsilon` over
    :math:`C` classes, the loss of element :math:`n` is

    .. math::
        \ell_n = (1 - \varepsilon)\, w_{y_n} \bigl(-\log p_{n,y_n}\bigr)
                 + \frac{\varepsilon}{C} \sum_c w_c \bigl(-\log p_{n,c}\bigr)
                 + z\, w_{y_n} \operatorname{lse}(x_n)^2

    with :math:`p_n = \operatorname{softmax}(x_n)`; with probabilities :math:`t_n` it is
    :math:`-\sum_c w_c\, t'_{n,c} \log p_{n,c} + z \operatorname{lse}(x_n)^2` with
    :math:`t' = (1 - \varepsilon) t + \varepsilon / C`. Targets equal to ``ignore_index`` contribute 0.

    .. math::
        \text{reduction} = \begin{cases}
            \sum_n \ell_n / \sum_n w_{y_n} [y_n \ne \text{ignore}] & \texttt{mean}\text{, class indices} \\
            \sum_n \ell_n / (N d_1 \cdots d_K) & \texttt{mean}\text{, probabilities} \\
            \sum_n \ell_n & \texttt{sum} \\
            (\ell_n)_n & \texttt{none}
        \end{cases}

    Values and gradients equal :func:`torch.nn.functional.cross_entropy` for every input it accepts, with three
    deliberate differences:

    1. ``reduction="mean"`` with no non-ignored target (or an empty batch) returns 0 with a zero gradient, where
       PyTorch returns NaN; and an ignored row is absent whatever it holds (NaN or ±inf there leaves the loss and
       the gradient as without the row, where PyTorch's gradient of a NaN row is NaN).
    2. ``z_loss=z`` adds the auxiliary loss :math:`z \cdot \operatorname{lse}(x)^2` of PaLM (Chowdhery et al., 2022),
       which keeps the log-partition near 0; it is weighted by :math:`w_{y_n}` and reduced like the main term,
       ignored targets excluded.
    3. ``softcap=c`` replaces the logits by :math:`c \tanh(x / c)` before the softmax, as Gemma 2
       (Gemma Team, 2024); the gradient flows through the cap.

    float16/bfloat16 logits are accumulated in float32 and the result is cast back to the input's dtype, so logits
    up to ±1e4 give finite, correct losses and gradients in every dtype. Under ``torch.autocast`` the result is
    float32, as PyTorch's (computed without a float32 copy of the logits).

    Every implementation differentiates the logits, probability targets and ``weight`` with the reference's
    gradient (PyTorch refuses a ``weight`` that requires grad with class indices; xent differentiates it). The fused
    kernels form the gradient in the forward pass, so they cannot be differentiated twice: a second-order gradient
    (``create_graph=True``) through ``impl="chunked"``/``"triton"`` — or the automatic choice, which picks them for
    training-sized problems — raises and names ``impl="reference"``, which supports it.

    Args:
        input: logits of shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        target: class indices of shape ``()``, ``(N)`` or ``(N, d1, ..., dK)`` with an integer dtype, each in
            ``[0, C)`` or equal to ``ignore_index``; or probabilities with the input's shape and a floating dtype.
        weight: per-class weight of shape ``(C,)``.
        ignore_index: a class-index target value that contributes neither loss nor gradient; with probability
            targets it must stay negative (the default), as in PyTorch.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        label_smoothing: :math:`\varepsilon \in [0, 1]`, mixes the target with the uniform distribution.
        z_loss: :math:`z \ge 0`, weight of the squared log-partition term.
        softcap: :math:`c > 0`, soft cap of the logits; ``None`` for none.
        token_weight: per-element weights :math:`r_n` with the target's batch shape: each element's loss is
            multiplied by :math:`r_n`, and ``"mean"`` divides by :math:`\sum_n r_n w_{y_n}` (as class weights do) —
            token-weighted fine-tuning. Not differentiated by the fused kernels (``impl="reference"`` does).
        impl: ``None`` picks the fastest implementation for the device and problem — on the CPU, for up to
            262,144 logits with no option beyond ``weight``, ``ignore_index`` and ``label_smoothing``,
            :func:`torch.nn.functional.cross_entropy` itself wherever it gives exactly this loss; ``"reference"``
            forces the plain PyTorch math of this module, ``"chunked"`` the memory-lean kernel that forms the
            gradient during the forward pass (``xent.kernels.chunked``); ``"triton"`` the GPU kernel where
            available.
        inplace_backward: write the gradient into the logits' own storage (chunked and Triton kernels), saving a
            logits-sized buffer; the logits are overwritten, so use it only when nothing else needs them.

    Returns:
        The loss, of shape ``()`` or, with ``reduction="none"``, the batch shape; in the input's dtype.

    Raises:
        ValueError: a bad option value or a target whose shape fits neither class indices nor probabilities; a
            class index out of range (checked for CPU tensors by default, see :func:`xent.set_value_checks`).
        TypeError: a non-floating input, floating class indices.

    Example:
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
        >>> xent.cross_entropy(logits, torch.tensor([0, 2]), label_smoothing=0.1)
        tensor(0.3431)
    """
    label_smoothing, z_loss, softcap = check_softmax_options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, ignore_index=ignore_index
    )
    logits, target, batch_shape = canonicalize(input, target)
    options = RowLoss(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        token_weight=check_token_weight(token_weight, batch_shape),
    )
    options = checked_options(options, weight, target, logits.shape[-1])
    # Under autocast: no float32 copy of the logits — every impl already computes in float32 — only a float32 result.
    with autocast_off(input):
        loss = dispatch_logits_loss(impl, logits, target, options, reduction, inplace_backward=inplace_backward)
    return (loss.view(batch_shape) if reduction == "none" else loss).to(result_dtype(input))
