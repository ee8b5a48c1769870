"""Post-hoc calibration: temperature scaling."""

from __future__ import annotations

import math

import torch

from xent.losses import checks
from xent.losses.softmax import canonicalize


def fit_temperature(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    min_temperature: float = 1e-2,
    max_temperature: float = 1e2,
    tolerance: float = 1e-7,
) -> torch.Tensor:
    r"""The temperature :math:`T` that minimises the negative log-likelihood of held-out logits.

    .. math::
        T^\star = \arg\min_T \frac{1}{N} \sum_n -\log \operatorname{softmax}(x_n / T)_{y_n}

    The NLL is convex in :math:`s = 1/T` (its second derivative is the variance of the logits under the softmax),
    so its derivative is increasing in :math:`s` and a bisection on :math:`\log s` finds the unique minimum in
    ``[1/max_temperature, 1/min_temperature]`` — deterministic, with no learning rate to tune. Divide test logits
    by the result to calibrate a classifier without changing its predictions.

    Args:
        logits: held-out (validation) logits ``(N, C)`` or ``(N, C, d1, ..., dK)``; no gradient flows.
        target: class indices ``(N)`` or ``(N, d1, ..., dK)``.
        min_temperature, max_temperature: the search interval; the result is clipped to it.
        tolerance: relative precision of :math:`T`.

    Returns:
        :math:`T` as a 0-d float64 tensor.

    References:
        Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks. ICML 2017.
    """
    min_temperature = checks.check_in_range("min_temperature", min_temperature, 0.0, low_inclusive=False)
    max_temperature = checks.check_in_range("max_temperature", max_temperature, min_temperature, low_inclusive=False)
    x, target, _ = canonicalize(checks.check_tensor("logits", logits).detach(), target, "logits")
    if target.is_floating_point():
        raise TypeError("fit_temperature takes class indices as target, not probabilities")
    checks.check_class_indices(target, x.shape[-1], ignore_index=-100)
    if target.numel() == 0:
        raise ValueError("fit_temperature needs at least one example, got an empty target")
    x = x.double()
    target_logit = x.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    def slope(log_s: float) -> float:
        # d NLL / ds = mean(E_p[x] - x_y) with p = softmax(s x)
        p = torch.softmax(x * math.exp(log_s), dim=-1)
        return float(((p * x).sum(-1) - target_logit).mean())

    low, high = -math.log(max_temperature), -math.log(min_temperature)
    if slope(low) >= 0:
        return torch.tensor(max_temperature, dtype=torch.float64)
    if slope(high) <= 0:
        return torch.tensor(min_temperature, dtype=torch.float64)
    while high - low > tolerance:
        middle = 0.5 * (low + high)
        if slope(middle) < 0:
            low = middle
        else:
            high = middle
    return torch.tensor(math.exp(-0.5 * (low + high)), dtype=torch.float64)
