"""Losses that tolerate noisy labels: generalized cross-entropy and symmetric cross-entropy."""

from __future__ import annotations

from typing import Any

import torch

from xent.core.autocast import float32_under_autocast
from xent.core.rowloss import GeneralizedTerm, RowLoss, SymmetricTerm
from xent.kernels.dispatch import Impl
from xent.losses import checks
from xent.losses.softmax import class_index_loss, cross_entropy, fused_index_loss, target_log_prob


@float32_under_autocast
def generalized_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    q: float = 0.7,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weight: torch.Tensor | None = None,
    impl: Impl | None = None,
) -> torch.Tensor:
    r"""Generalized cross-entropy (the :math:`L_q` loss): between cross-entropy and mean absolute error.

    .. math::
        \ell_n = w_{y_n} \frac{1 - p_{n,y_n}^{\,q}}{q}

    :math:`q \to 0` recovers cross-entropy (fast to train, sensitive to wrong labels); :math:`q = 1` is MAE
    (robust, slow). :math:`p^q` is computed as :math:`\exp(q \log p)` and :math:`1 - e^{a}` with ``expm1``, so small
    :math:`q` does not lose precision.

    Args:
        q: :math:`q \in (0, 1]`; default 0.7 (the paper's).
        weight, ignore_index, reduction: as in :func:`xent.cross_entropy`.
        token_weight: per-element weights with the target's shape, as in :func:`xent.cross_entropy`.
        impl: ``None`` (automatic: the fused kernel for training-sized problems), ``"reference"`` (this function's
            plain definition), ``"chunked"`` or ``"triton"``, as in :func:`xent.cross_entropy`.

    References:
        Zhang, Sabuncu. Generalized Cross Entropy Loss for Training Deep Neural Networks with Noisy Labels.
        NeurIPS 2018.
    """
    q = checks.check_in_range("q", q, 0.0, 1.0, low_inclusive=False)

    def row_loss(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(q * target_log_prob(log_probs, target)) / q

    options: dict[str, Any] = {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "token_weight": token_weight,
    }
    return fused_index_loss(
        "generalized_cross_entropy",
        input,
        target,
        lambda: class_index_loss("generalized_cross_entropy", input, target, row_loss, **options),
        impl=impl,
        description=describe_generalized(0, q=q),
        **options,
    )


def describe_generalized(num_classes: int, *, q: float = 0.7) -> RowLoss:
    """The row-loss description of :func:`generalized_cross_entropy`."""
    return RowLoss(term=GeneralizedTerm(q=checks.check_in_range("q", q, 0.0, 1.0, low_inclusive=False)))


@float32_under_autocast
def symmetric_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.1,
    beta: float = 1.0,
    log_zero: float = -4.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weight: torch.Tensor | None = None,
    impl: Impl | None = None,
) -> torch.Tensor:
    r"""Symmetric cross-entropy: cross-entropy plus reverse cross-entropy.

    .. math::
        \ell_n = w_{y_n} \bigl[\alpha \operatorname{CE}_n + \beta \operatorname{RCE}_n\bigr], \qquad
        \operatorname{RCE}_n = -\sum_c p_{n,c} \log q_{n,c} = -A\,(1 - p_{n,y_n})

    where :math:`q_n` is the one-hot label, whose :math:`\log 0` is replaced by :math:`A` = ``log_zero``. The reverse
    term is bounded and robust to label noise; the forward term keeps learning fast.

    Args:
        alpha: weight :math:`\alpha \ge 0` of cross-entropy; default 0.1 (the paper's CIFAR-10 setting).
        beta: weight :math:`\beta \ge 0` of reverse cross-entropy; default 1.0.
        log_zero: :math:`A < 0`, the value given to :math:`\log 0`; default -4 (the paper's).
        weight, ignore_index, reduction: as in :func:`xent.cross_entropy`.
        token_weight: per-element weights with the target's shape, as in :func:`xent.cross_entropy`.
        impl: ``None`` (automatic: the fused kernel for training-sized problems), ``"reference"`` (this function's
            plain definition), ``"chunked"`` or ``"triton"``, as in :func:`xent.cross_entropy`.

    References:
        Wang, Ma, Chen, Luo, Yi, Bailey. Symmetric Cross Entropy for Robust Learning with Noisy Labels. ICCV 2019.
    """
    alpha = checks.check_in_range("alpha", alpha, 0.0)
    beta = checks.check_in_range("beta", beta, 0.0)
    log_zero = checks.check_in_range("log_zero", log_zero, high=0.0, high_inclusive=False)

    def reverse_cross_entropy(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return beta * -log_zero * -torch.expm1(target_log_prob(log_probs, target))

    options: dict[str, Any] = {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "token_weight": token_weight,
    }

    def readable() -> torch.Tensor:
        # Both terms share the denominator of "mean" (Σ w_y over kept targets): the sum of the reduced terms.
        forward = alpha * cross_entropy(input, target, impl="reference", **options)
        return forward + class_index_loss("symmetric_cross_entropy", input, target, reverse_cross_entropy, **options)

    return fused_index_loss(
        "symmetric_cross_entropy",
        input,
        target,
        readable,
        impl=impl,
        description=describe_symmetric(0, alpha=alpha, beta=beta, log_zero=log_zero),
        **options,
    )


def describe_symmetric(num_classes: int, *, alpha: float = 0.1, beta: float = 1.0, log_zero: float = -4.0) -> RowLoss:
    """The row-loss description of :func:`symmetric_cross_entropy`."""
    alpha = checks.check_in_range("alpha", alpha, 0.0)
    beta = checks.check_in_range("beta", beta, 0.0)
    log_zero = checks.check_in_range("log_zero", log_zero, high=0.0, high_inclusive=False)
    return RowLoss(term=SymmetricTerm(alpha=alpha, beta=beta, log_zero=log_zero))
