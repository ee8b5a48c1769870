"""Losses that reshape cross-entropy by the predicted probability of the target: focal and Poly-1."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F

from xent.core.autocast import float32_under_autocast
from xent.core.reduce import accumulation_dtype, reduce_loss
from xent.core.rowloss import FocalTerm, Poly1Term, RowLoss
from xent.kernels.dispatch import Impl
from xent.losses import checks
from xent.losses.sigmoid import binary_cross_entropy_with_logits, check_binary_pair
from xent.losses.softmax import class_dimension, class_index_loss, cross_entropy, fused_index_loss, target_log_prob


def _modulating_factor(log_one_minus_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - p)^γ from log(1 - p): exact for p → 1, where ``1 - p`` formed directly would round to 0."""
    return torch.exp(gamma * log_one_minus_p) if gamma else torch.ones_like(log_one_minus_p)


def _log_one_minus_p_t(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log σ(x), log σ(−x) and L = log(1 − p_t) = log(t σ(−x) + (1 − t) σ(x)), from log-sigmoids: exact at ±1e4."""
    log_p, log_not_p = F.logsigmoid(x), F.logsigmoid(-x)
    return log_p, log_not_p, torch.logaddexp(torch.log(t) + log_not_p, torch.log1p(-t) + log_p)


class _SigmoidModulationFunction(torch.autograd.Function):
    r"""The sigmoid focal loss's :math:`(1 - p_t)^\gamma = e^{\gamma L}`, with its gradients written out.

    Autograd through :math:`L`'s ``log(t)`` gives ∞ · 0 = NaN for a target of exactly 0 or 1 that requires grad;
    written out, each gradient is one exponential of a sum of logs, finite at every target and logit:
    :math:`\partial_x = \gamma (1 - 2t)\, e^{(\gamma - 1) L + \log\sigma(x) + \log\sigma(-x)}` and
    :math:`\partial_t = \gamma\, (e^{(\gamma - 1) L + \log\sigma(-x)} - e^{(\gamma - 1) L + \log\sigma(x)})`.
    The backward pass recomputes them from ``x`` and ``t`` with differentiable operations, so second-order
    gradients stay exact for targets strictly inside (0, 1) (at 0 or 1 the recomputed ``log(t)`` makes the mixed
    second derivative NaN).
    """

    generate_vmap_rule = True  # forward is plain torch operations: torch.func.vmap batches them

    @staticmethod
    def forward(x: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
        return torch.exp(gamma * _log_one_minus_p_t(x, t)[2])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, t, gamma = inputs
        ctx.save_for_backward(x, t)
        ctx.gamma = gamma

    @staticmethod
    def _partials(x: torch.Tensor, t: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """∂/∂x and ∂/∂t of the modulating factor, each one exponential of a sum of logs."""
        log_p, log_not_p, log_one_minus_p_t = _log_one_minus_p_t(x, t)
        power = (gamma - 1) * log_one_minus_p_t
        by_x = gamma * (1 - 2 * t) * torch.exp(power + log_p + log_not_p)
        by_t = gamma * (torch.exp(power + log_not_p) - torch.exp(power + log_p))
        return by_x, by_t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, t = ctx.saved_tensors
        by_x, by_t = _SigmoidModulationFunction._partials(x, t, ctx.gamma)
        grad_x = grad * by_x if ctx.needs_input_grad[0] else None
        grad_t = grad * by_t if ctx.needs_input_grad[1] else None
        return grad_x, grad_t, None


class _SigmoidModulation(_SigmoidModulationFunction):
    """:class:`_SigmoidModulationFunction` with forward-mode AD too (``torch.func.jvp``, ``jacfwd``). Dynamo cannot
    trace a Function that defines ``jvp``, so a compiled call takes the parent class."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _SigmoidModulationFunction.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:2])

    @staticmethod
    def jvp(ctx: Any, x_tangent: torch.Tensor | None, t_tangent: torch.Tensor | None, _: None) -> torch.Tensor:
        x, t = ctx.saved_tensors
        by_x, by_t = _SigmoidModulation._partials(x, t, ctx.gamma)
        tangent = torch.zeros_like(by_x)
        if x_tangent is not None:
            tangent = tangent + by_x * x_tangent
        if t_tangent is not None:
            tangent = tangent + by_t * t_tangent
        return tangent


def _log_one_minus_exp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a ≤ 0, finite at a = 0 (clamped to the dtype's tiny) so its gradient stays finite."""
    return torch.log((-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny))


@float32_under_autocast
def focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weight: torch.Tensor | None = None,
    impl: Impl | None = None,
) -> torch.Tensor:
    r"""Softmax focal loss: cross-entropy that down-weights examples the model already gets right.

    .. math::
        \ell_n = -\alpha_{y_n} w_{y_n} (1 - p_{n,y_n})^\gamma \log p_{n,y_n}, \qquad p_n = \operatorname{softmax}(x_n)

    With :math:`\gamma = 0` and no :math:`\alpha` it is :func:`xent.cross_entropy`. ``weight``, ``ignore_index`` and
    the reductions behave as in :func:`xent.cross_entropy` ("mean" divides by :math:`\sum w_{y_n}`; α does not enter
    the denominator). :math:`(1 - p)^\gamma` is computed from :math:`\log p` with ``expm1``, so confident predictions
    do not round it to 0 prematurely.

    Coming from Keras: ``CategoricalFocalCrossentropy(alpha=0.25, gamma=2.0, from_logits=True)`` takes one-hot
    targets and always applies its scalar ``alpha`` (default 0.25); here the target is the class index
    (``one_hot.argmax(-1)``), ``alpha`` defaults to ``None`` (no weighting), so pass ``alpha=0.25`` for Keras' loss.
    A per-class ``alpha`` tensor is the class-balanced variant; it multiplies each element's loss but, unlike
    ``weight``, does not enter the mean's denominator. For the sigmoid (multi-label) focal loss of torchvision and
    Keras' ``BinaryFocalCrossentropy`` see :func:`sigmoid_focal_loss`.

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        target: class indices ``()``, ``(N)`` or ``(N, d1, ..., dK)``.
        gamma: focusing parameter :math:`\gamma \ge 0`; default 2 (the paper's best).
        alpha: balancing factor: a scalar for every class, a ``(C,)`` tensor per class, or ``None`` (1).
        weight, ignore_index, reduction: as in :func:`xent.cross_entropy`.
        token_weight: per-element weights with the target's shape, as in :func:`xent.cross_entropy`.
        impl: ``None`` (automatic: the fused kernel for training-sized problems), ``"reference"`` (this function's
            plain definition), ``"chunked"`` or ``"triton"``, as in :func:`xent.cross_entropy`.

    References:
        Lin, Goyal, Girshick, He, Dollár. Focal Loss for Dense Object Detection. ICCV 2017.
    """
    class_dim = class_dimension(input)
    description = describe_focal(input.shape[class_dim], gamma=gamma, alpha=alpha)
    gamma, alpha = cast(FocalTerm, description.term).gamma, description.alpha  # alpha: a (C,) tensor or None

    def row_loss(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = target_log_prob(log_probs, target)
        loss = -_modulating_factor(_log_one_minus_exp(log_p), gamma) * log_p
        return loss if alpha is None else loss * alpha.to(loss.dtype)[target]

    options: dict[str, Any] = {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "token_weight": token_weight,
    }
    return fused_index_loss(
        "focal_loss",
        input,
        target,
        lambda: class_index_loss("focal_loss", input, target, row_loss, **options),
        impl=impl,
        description=description,
        **options,
    )


def describe_focal(num_classes: int, *, gamma: float = 2.0, alpha: float | torch.Tensor | None = None) -> RowLoss:
    """The row-loss description of :func:`focal_loss`'s own options, checked."""
    return RowLoss(
        term=FocalTerm(gamma=checks.check_in_range("gamma", gamma, 0.0)), alpha=_check_alpha(alpha, num_classes)
    )


def _check_alpha(alpha: float | torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """α as a ``(C,)`` tensor (a scalar is the same factor for every class), or None."""
    if alpha is None:
        return None
    if isinstance(alpha, torch.Tensor):
        alpha = checks.check_floating("alpha", alpha)
        if alpha.shape != (num_classes,):
            raise ValueError(
                f"alpha must be a scalar or have shape ({num_classes},), one entry per class, "
                f"got shape {checks.shape_str(alpha.shape)}"
            )
        return alpha
    return torch.full((num_classes,), checks.check_in_range("alpha", alpha, 0.0), dtype=torch.float64)


def check_sigmoid_focal_options(*, gamma: float, alpha: float | None, reduction: str) -> tuple[float, float | None]:
    """The options of :func:`sigmoid_focal_loss` (and its module), checked; ``alpha=-1`` becomes ``None``."""
    checks.check_reduction(reduction)
    gamma = checks.check_in_range("gamma", gamma, 0.0)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha == -1:
        alpha = None  # torchvision's spelling of "no weighting"
    if alpha is not None:
        alpha = checks.check_in_range("alpha", alpha, 0.0, 1.0)
    return gamma, alpha


@float32_under_autocast
def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Sigmoid focal loss for binary and multi-label classification (dense detection's loss).

    .. math::
        \ell = \alpha_t (1 - p_t)^\gamma \operatorname{BCE}(x, t), \qquad
        p_t = p\,t + (1 - p)(1 - t), \quad \alpha_t = \alpha\,t + (1 - \alpha)(1 - t), \quad p = \sigma(x).

    The same formula as torchvision's ``sigmoid_focal_loss``, computed in log space:
    :math:`1 - p_t = t\,\sigma(-x) + (1 - t)\,\sigma(x)`, so :math:`\log(1 - p_t)` is a ``logaddexp`` of
    log-sigmoids and logits of ±1e4 give finite losses and gradients. With :math:`\gamma = 0` and ``alpha=None``
    it is :func:`xent.binary_cross_entropy_with_logits`.

    Coming from another library:

    - torchvision's ``sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2, reduction="none")`` is
      ``xent.sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2, reduction="none")``; note that xent's default
      reduction is ``"mean"``, as every xent loss. torchvision's ``alpha=-1`` ("no weighting") is accepted and means
      ``alpha=None``.
    - Keras' ``BinaryFocalCrossentropy(apply_class_balancing=False, alpha=0.25, gamma=2.0, from_logits=True)``
      ignores ``alpha`` unless ``apply_class_balancing=True``: it is ``alpha=None`` here, and
      ``apply_class_balancing=True`` is ``alpha=alpha``. xent always takes logits (``from_logits=True``); Keras'
      default reduction (``"sum_over_batch_size"``) is ``"mean"``.

    Args:
        input: logits, any shape.
        target: targets in [0, 1] with the input's shape.
        gamma: focusing parameter :math:`\gamma \ge 0`; default 2.
        alpha: weight of the positive class in [0, 1]; default 0.25 (the paper's); ``None`` (or torchvision's
            ``-1``) disables it.
        reduction: ``"none"`` | ``"mean"`` (over all elements) | ``"sum"``.

    References:
        Lin, Goyal, Girshick, He, Dollár. Focal Loss for Dense Object Detection. ICCV 2017.
    """
    gamma, alpha = check_sigmoid_focal_options(gamma=gamma, alpha=alpha, reduction=reduction)
    input, target = check_binary_pair(input, target)
    dtype = accumulation_dtype(input.dtype)
    x, t = input.to(dtype), target.to(dtype)
    loss = binary_cross_entropy_with_logits(x, t, reduction="none")
    if gamma:
        if torch.compiler.is_compiling():  # Dynamo cannot trace a Function with a jvp
            loss = loss * _SigmoidModulationFunction.apply(x, t, gamma)  # type: ignore[no-untyped-call]
        else:
            loss = loss * _SigmoidModulation.apply(x, t, gamma)
    if alpha is not None:
        loss = loss * (alpha * t + (1.0 - alpha) * (1.0 - t))
    return reduce_loss(loss, reduction).to(input.dtype)


@float32_under_autocast
def poly1_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float = 1.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    token_weight: torch.Tensor | None = None,
    impl: Impl | None = None,
) -> torch.Tensor:
    r"""Poly-1 cross-entropy: cross-entropy plus a first-order term that adjusts its leading polynomial coefficient.

    .. math::
        \ell_n = w_{y_n} \bigl[\operatorname{CE}_n + \varepsilon\,(1 - p_{t,n})\bigr], \qquad
        p_{t,n} = \sum_c t'_{n,c}\, p_{n,c}

    where :math:`t'` is the (label-smoothed) one-hot target, so without smoothing :math:`p_t = p_{y}`, and
    :math:`w_{y_n}\operatorname{CE}_n` is :func:`xent.cross_entropy`'s term (with PyTorch's weighting of the
    smoothing part).
    With :math:`\varepsilon = 0` it is cross-entropy; :math:`\varepsilon = -1` removes the first-order term.

    Args:
        epsilon: :math:`\varepsilon \ge -1`; default 1 (the paper's recommended starting point).
        weight, ignore_index, reduction, label_smoothing: as in :func:`xent.cross_entropy`.
        token_weight: per-element weights with the target's shape, as in :func:`xent.cross_entropy`.
        impl: ``None`` (automatic: the fused kernel for training-sized problems), ``"reference"`` (this function's
            plain definition), ``"chunked"`` or ``"triton"``, as in :func:`xent.cross_entropy`.

    References:
        Leng, Xu, Tan, et al. PolyLoss: A Polynomial Expansion Perspective of Classification Loss Functions.
        ICLR 2022.
    """
    description = describe_poly1(0, epsilon=epsilon, label_smoothing=label_smoothing)
    epsilon, label_smoothing = cast(Poly1Term, description.term).epsilon, description.label_smoothing
    options: dict[str, Any] = {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "token_weight": token_weight,
    }

    def first_order_term(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p_t = torch.exp(target_log_prob(log_probs, target))
        if label_smoothing:
            p_t = (1.0 - label_smoothing) * p_t + label_smoothing / log_probs.shape[-1]  # Σ_c p_c = 1
        return epsilon * (1.0 - p_t)

    def readable() -> torch.Tensor:
        # Both terms share the denominator of "mean" (Σ w_y over kept targets): the sum of the reduced terms.
        ce = cross_entropy(input, target, label_smoothing=label_smoothing, impl="reference", **options)
        return ce + class_index_loss("poly1_cross_entropy", input, target, first_order_term, **options)

    return fused_index_loss(
        "poly1_cross_entropy",
        input,
        target,
        readable,
        impl=impl,
        description=description,
        **options,
    )


def describe_poly1(num_classes: int, *, epsilon: float = 1.0, label_smoothing: float = 0.0) -> RowLoss:
    """The row-loss description of :func:`poly1_cross_entropy`'s own options, checked."""
    return RowLoss(
        term=Poly1Term(epsilon=checks.check_in_range("epsilon", epsilon, -1.0)),
        label_smoothing=checks.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0),
    )
