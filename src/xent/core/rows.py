r"""The computation a row-loss description (:mod:`xent.core.rowloss`) asks for, once, in PyTorch.

Three pure steps, shared by every PyTorch implementation of the family:

1. :func:`transform` — the logits of a block (or of one gathered column) to :math:`z = s (\operatorname{cap}(x) + o
   - m_y e_y)`, with the cap's :math:`\tanh` kept for the chain rule; the reference differentiates it by autograd,
   the kernels chain it by hand;
2. the row statistics — :math:`\operatorname{lse}(z)`, :math:`z_y`, :math:`S = \sum_c w_c z_c` — which each
   implementation reduces its own way (a block in cache, or a shard per rank with an all-reduce between);
3. :func:`row_losses` and :func:`gradient_coefficients` — from the statistics to each row's loss, and to the
   coefficients of its gradient with respect to :math:`z`:

.. math::
    \frac{\partial \ell}{\partial z_c} = a\, p_c + g\, [c = y] - v \frac{\varepsilon}{C} w_c, \qquad
    g = w_y \alpha_y \psi'(u), \quad a = -g + v \frac{\varepsilon}{C} W + 2 \zeta w_y \operatorname{lse}

with :math:`v` 1 for a kept row and 0 for an ignored one, :math:`W = \sum_c w_c`. The chunked kernel
(:mod:`xent.kernels.chunked`) and the vocab-parallel layer (:mod:`xent.distributed.vocab_parallel`) call them; the
Triton kernel is their twin in one fused pass, tested against the same results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from xent.core.rowloss import RowLoss


def transform(
    x: torch.Tensor,
    options: RowLoss,
    *,
    classes: slice | torch.Tensor = slice(None),
    target_column: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""``(z, tanh(x / c))``: the description's transform of logits ``x`` ``(B, K)`` in their dtype (callers upcast
    first), and the cap's tanh for the chain rule (None without a cap).

    Args:
        x: logits ``(B, K)``.
        options: the description.
        classes: the classes of ``x``'s ``K`` columns — a slice of the vocabulary (whole rows, or a rank's shard) or
            ``(B, 1)`` class ids (each row's target column, gathered).
        target_column: ``(B, 1)``, each row's target's column in ``x`` when ``classes`` is a slice; read only with a
            margin.
        margin: ``(B, 1)``, each row's target margin :math:`m_y` (0 where the row's target is not among ``x``'s
            columns); required when the description has one.
        in_place: whether ``x`` may be overwritten (a scratch block); otherwise it is never written.
    """
    tanh = None
    if options.softcap is not None:
        tanh = torch.tanh(x / options.softcap)
        x = tanh * options.softcap
        in_place = True  # a new tensor from here on
    if options.class_offset is not None:
        offset = options.class_offset.to(device=x.device, dtype=x.dtype)[classes]
        x = x.add_(offset) if in_place else x + offset
        in_place = True
    if options.target_margin is not None:
        if margin is None:
            raise ValueError("a description with a target margin needs each row's margin")
        if isinstance(classes, torch.Tensor):  # x is the target's column itself
            x = x.sub_(margin) if in_place else x - margin
        elif target_column is None:
            raise ValueError("a description with a target margin needs each row's target column")
        else:
            x = x.scatter_add_(1, target_column, -margin) if in_place else x.scatter_add(1, target_column, -margin)
        in_place = True
    if options.logit_scale != 1.0:
        x = x.mul_(options.logit_scale) if in_place else x * options.logit_scale
    return x, tanh


@dataclass(frozen=True)
class TargetRows:
    r"""What a block of class-index rows takes from its targets, in the accumulation dtype, ``(B,)`` each:
    ``valid`` (1 kept, 0 ignored), ``target_weight`` :math:`v\,w_y` and ``main_weight`` :math:`v\,w_y \alpha_y`;
    ``total_weight`` is :math:`W = \sum_c w_c` over the whole vocabulary (``C`` without class weights)."""

    valid: torch.Tensor
    target_weight: torch.Tensor
    main_weight: torch.Tensor
    total_weight: torch.Tensor | float

    def __getitem__(self, rows: slice) -> TargetRows:
        return TargetRows(self.valid[rows], self.target_weight[rows], self.main_weight[rows], self.total_weight)


def row_losses(
    u: torch.Tensor,
    lse: torch.Tensor,
    smooth: torch.Tensor | None,
    rows: TargetRows,
    options: RowLoss,
    num_classes: int,
) -> torch.Tensor:
    r""":math:`w_y \alpha_y \psi(u) + v \frac{\varepsilon}{C} (W \operatorname{lse} - S) + \zeta w_y
    \operatorname{lse}^2` per row, from :math:`u = \log p_y`, the log-sum-exp and :math:`S = \sum_c w_c z_c` (read
    only with label smoothing). Ignored rows are the callers' to zero: whatever their logits held, they are masked
    with ``torch.where``, not multiplied by 0."""
    smoothing = options.label_smoothing
    loss = rows.main_weight * options.term.value(u, smoothing, num_classes)
    if smoothing:
        # PyTorch's uniform part: (ε/C) Σ_c w_c (lse - z_c), weighted class by class.
        smooth = cast(torch.Tensor, smooth)  # given with label smoothing
        loss = loss + rows.valid * (smoothing / num_classes) * (rows.total_weight * lse - smooth)
    if options.z_loss:
        loss = loss + options.z_loss * rows.target_weight * lse.square()
    return loss


def gradient_coefficients(
    u: torch.Tensor, lse: torch.Tensor, rows: TargetRows, options: RowLoss, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(a, g)`` per row: :math:`g = w_y \alpha_y \psi'(u)` and :math:`a = -g + v \frac{\varepsilon}{C} W +
    2 \zeta w_y \operatorname{lse}`, so that a row's gradient with respect to :math:`z` is :math:`a\, p + g\, e_y
    - v \frac{\varepsilon}{C} w` (see the module docstring)."""
    smoothing = options.label_smoothing
    slope = rows.main_weight * options.term.derivative(u, smoothing, num_classes)
    coefficient = rows.valid * (smoothing / num_classes * rows.total_weight) - slope
    if options.z_loss:
        coefficient = coefficient + 2.0 * options.z_loss * rows.target_weight * lse
    return coefficient, slope
