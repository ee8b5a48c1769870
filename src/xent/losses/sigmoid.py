"""Binary (sigmoid) cross-entropy, on logits and on probabilities."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from xent.core.autocast import float32_under_autocast
from xent.core.reduce import accumulation_dtype, reduce_loss
from xent.losses import checks


def check_binary_options(*, reduction: str, label_smoothing: float) -> float:
    """Validate the scalar options of the binary losses; shared by the functionals and the modules."""
    checks.check_reduction(reduction)
    return checks.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)


def check_binary_pair(
    input: torch.Tensor, target: torch.Tensor, names: tuple[str, str] = ("input", "target")
) -> tuple[torch.Tensor, torch.Tensor]:
    """Floating logits and targets of the same shape, the targets in [0, 1]; errors use the caller's ``names``."""
    input_name, target_name = names
    input = checks.check_floating(input_name, input)
    target = checks.check_floating(target_name, target)
    if target.shape != input.shape:
        raise ValueError(
            f"{target_name} has shape {checks.shape_str(target.shape)} but {input_name} has shape "
            f"{checks.shape_str(input.shape)}; binary targets must have the {input_name}'s shape"
        )
    checks.check_probabilities(target_name, target)
    return input, target


def _smooth(target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # Keras' binary convention: each target moves towards 1/2, the uniform distribution over {0, 1}.
    return target * (1.0 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else target


@float32_under_autocast
def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Binary cross-entropy between logits and targets in [0, 1].

    .. math::
        \ell = -w \bigl[\, p\, t' \log \sigma(x) + (1 - t') \log(1 - \sigma(x)) \bigr],
        \qquad t' = (1 - \varepsilon)\, t + \varepsilon / 2,

    with ``weight`` :math:`w` and ``pos_weight`` :math:`p`. It is computed as
    :math:`w [p\, t' \operatorname{softplus}(-x) + (1 - t') \operatorname{softplus}(x)]`: softplus never takes the
    log of a sigmoid that has underflowed to 0, so logits of ±1e4 give exact, finite losses and gradients.
    Multi-label input ``(N, C)`` with ``(N, C)`` targets is the per-class binary cross-entropy; ``"mean"`` averages
    over all elements, as PyTorch.

    Values and gradients equal :func:`torch.nn.functional.binary_cross_entropy_with_logits`; ``label_smoothing`` is
    xent's addition (Keras' binary semantics: targets move towards 1/2). Half precision is computed in float32.

    Args:
        input: logits, any shape.
        target: targets in [0, 1] with the input's shape (checked for CPU tensors, see
            :func:`xent.set_value_checks`).
        weight: rescales each element; must broadcast to the input's shape.
        pos_weight: weight of the positive term, typically ``(C,)`` for ``(N, C)`` input (``n_negative / n_positive``
            per class); must broadcast to the input's shape.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        label_smoothing: :math:`\varepsilon \in [0, 1]`.

    Returns:
        The loss, of shape ``()`` or the input's shape for ``"none"``, in the input's dtype.

    Example:
        >>> xent.binary_cross_entropy_with_logits(torch.tensor([3.0, -1.0]), torch.tensor([1.0, 0.0]))
        tensor(0.1809)
    """
    label_smoothing = check_binary_options(reduction=reduction, label_smoothing=label_smoothing)
    input, target = check_binary_pair(input, target)
    weight = checks.check_broadcasts_to("weight", weight, input.shape, "input of shape")
    pos_weight = checks.check_broadcasts_to("pos_weight", pos_weight, input.shape, "input of shape")

    dtype = accumulation_dtype(input.dtype)
    x = input.to(dtype)
    t = _smooth(target.to(dtype), label_smoothing)
    # -log σ(x) and -log(1 - σ(x)) = softplus(∓x), as log-sigmoids: exact in float64 at every x (F.softplus returns
    # x itself above its threshold of 20, 2e-9 off), and never the log of an underflowed sigmoid
    positive = -F.logsigmoid(x)
    if pos_weight is not None:
        positive = positive * pos_weight.to(dtype)
    loss = t * positive - (1.0 - t) * F.logsigmoid(-x)
    if weight is not None:
        loss = loss * weight.to(dtype)
    return reduce_loss(loss, reduction).to(input.dtype)


# PyTorch's ε of the binary cross-entropy's gradient: 1e-12 rounded to float32 (a module constant, which a compiled
# backward can read, unlike a class attribute of the Function)
_BCE_EPSILON = 9.999999960041972e-13


class _ClampedBinaryCrossEntropy(torch.autograd.Function):
    """-[t log p + (1 - t) log(1 - p)] with each log clamped at -100, and PyTorch's gradient.

    Autograd through ``clamp(log(p), min=-100)`` gives 0 · ∞ = NaN at p = 0 or 1; PyTorch instead defines
    ∂ℓ/∂p = (p - t) / max(p (1 - p), ε), finite everywhere. We reproduce that, with PyTorch's ε: 1e-12 rounded to
    float32.
    """

    @staticmethod
    def forward(ctx: Any, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(probs, target)
        log_p, log_not_p = _ClampedBinaryCrossEntropy.clamped_logs(probs)
        return -(target * log_p + (1.0 - target) * log_not_p)

    @staticmethod
    def clamped_logs(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.log(probs).clamp_min(-100.0), torch.log1p(-probs).clamp_min(-100.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Formed from the saved inputs by differentiable operations, so that a second derivative
        # (create_graph=True) sees their dependence on the probabilities and the target.
        probs, target = ctx.saved_tensors
        grad_probs = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_probs = grad * (probs - target) / (probs * (1.0 - probs)).clamp_min(_BCE_EPSILON)
        if ctx.needs_input_grad[1]:
            log_p, log_not_p = _ClampedBinaryCrossEntropy.clamped_logs(probs)
            grad_target = grad * (log_not_p - log_p)
        return grad_probs, grad_target


@float32_under_autocast
def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Binary cross-entropy between probabilities and targets in [0, 1].

    .. math::
        \ell = -w \bigl[\, t' \max(\log p, -100) + (1 - t') \max(\log(1 - p), -100) \bigr],
        \qquad t' = (1 - \varepsilon)\, t + \varepsilon / 2.

    Values and gradients equal :func:`torch.nn.functional.binary_cross_entropy`, the clamp of each log at -100
    included; the gradient with respect to the target uses the same clamped logs, so it is finite (±100) at
    ``p`` = 0 or 1 where PyTorch's is ±inf.

    Prefer :func:`binary_cross_entropy_with_logits`: once a sigmoid has rounded to exactly 0 or 1 (float32 does
    so from logits of about ±17, float16 from about ±8), the clamp is all that is left of the loss, its gradient no
    longer says how wrong the prediction is, and the lost information cannot be recovered from ``p``. On logits the
    same loss is computed exactly at any magnitude.

    Args:
        input: probabilities in [0, 1], any shape (checked for CPU tensors, see :func:`xent.set_value_checks`).
        target: targets in [0, 1] with the input's shape.
        weight: rescales each element; must broadcast to the input's shape.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        label_smoothing: :math:`\varepsilon \in [0, 1]`.

    Returns:
        The loss, of shape ``()`` or the input's shape for ``"none"``, in the input's dtype.

    Example:
        >>> xent.binary_cross_entropy(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0]))
        tensor(0.1643)
    """
    label_smoothing = check_binary_options(reduction=reduction, label_smoothing=label_smoothing)
    input, target = check_binary_pair(input, target)
    checks.check_probabilities("input", input)
    weight = checks.check_broadcasts_to("weight", weight, input.shape, "input of shape")

    dtype = accumulation_dtype(input.dtype)
    loss = _ClampedBinaryCrossEntropy.apply(input.to(dtype), _smooth(target.to(dtype), label_smoothing))
    if weight is not None:
        loss = loss * weight.to(dtype)
    return reduce_loss(loss, reduction).to(input.dtype)
