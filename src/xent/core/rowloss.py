r"""The description of a softmax loss, one row at a time — what every implementation reads.

An index-target softmax loss of the family is, for a row of logits :math:`x` with target :math:`y`:

1. a **transform** of the logits, :math:`z = s\,(\operatorname{cap}(x) + o - m_y e_y)`: the soft cap
   :math:`c \tanh(x / c)` (Gemma 2), a per-class offset :math:`o` (logit adjustment's :math:`\tau \log \pi`, balanced
   softmax's :math:`\log n`), a margin :math:`m_y` taken off the target's logit and a scale :math:`s` (LDAM);
2. a **target term** :math:`\psi(u)` of the target's log-probability :math:`u = \log p_y = z_y - \operatorname{lse}(z)`,
   with its derivative :math:`\psi'(u)` — cross-entropy's :math:`-u`, focal's :math:`-(1 - e^u)^\gamma u`, …;
3. the options every loss shares: class weights :math:`w`, a per-class factor :math:`\alpha` of the target term
   (focal's α, which unlike :math:`w` does not enter the mean's denominator), label smoothing ε, z-loss, per-token
   weights :math:`r_n`, ``ignore_index``:

.. math::
    \ell_n = r_n \Bigl[ w_y \alpha_y\, \psi(u) + \frac{\varepsilon}{C} \sum_c w_c (\operatorname{lse} - z_c)
             + \zeta\, w_y \operatorname{lse}^2 \Bigr], \qquad
    \frac{\partial \ell_n}{\partial z} = r_n \Bigl[ w_y \alpha_y \psi'(u) (e_y - p)
             + \frac{\varepsilon}{C} (W p - w) + 2 \zeta\, w_y \operatorname{lse}\, p \Bigr]

and ``reduction="mean"`` divides by :math:`\sum_n r_n w_{y_n}` over kept targets. Adding a loss of this shape means
writing its :class:`TargetTerm` (ψ and ψ′, a name of its own and its ``PARAMETERS``), adding it to :data:`TERMS` (the
fused kernels' custom operators rebuild a term from its name and numbers) and choosing its transform — the kernels
need nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch


def _one_minus_exp(u: torch.Tensor) -> torch.Tensor:
    """1 - e^u for u ≤ 0, exact near u = 0 where 1 - p would round to 0."""
    return -torch.expm1(u)


@dataclass(frozen=True)
class TargetTerm:
    r"""Cross-entropy's target term, :math:`\psi(u) = -(1 - \varepsilon)\, u`; the base of every other term.

    ``value`` and ``derivative`` take :math:`u = \log p_y` ``(M,)`` (in the accumulation dtype), the label smoothing
    and the number of classes. A subclass overrides both.
    """

    name: str = field(default="cross_entropy", init=False)
    PARAMETERS: ClassVar[tuple[str, ...]] = ()  # the term's numbers, in its constructor's order

    def parameters(self) -> list[float]:
        """The term's numbers in its constructor's order: what a custom operator's arguments carry of it."""
        return [float(getattr(self, name)) for name in self.PARAMETERS]

    def value(self, u: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
        return -(1.0 - smoothing) * u

    def derivative(self, u: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
        return torch.full_like(u, -(1.0 - smoothing))


@dataclass(frozen=True)
class FocalTerm(TargetTerm):
    r""":math:`\psi(u) = -(1 - e^u)^\gamma u` (Lin et al., 2017)."""

    gamma: float = 2.0
    name: str = field(default="focal", init=False)
    PARAMETERS: ClassVar[tuple[str, ...]] = ("gamma",)

    def _log_one_minus_p(self, u: torch.Tensor) -> torch.Tensor:
        # clamped at the dtype's tiny so that (1 - p)^(γ - 1) stays finite at p = 1 (its product with u is 0 there)
        return torch.log(_one_minus_exp(u).clamp_min(torch.finfo(u.dtype).tiny))

    def value(self, u: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
        return -torch.exp(self.gamma * self._log_one_minus_p(u)) * u if self.gamma else -u

    def derivative(self, u: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
        if not self.gamma:
            return torch.full_like(u, -1.0)
        log_one_minus_p = self._log_one_minus_p(u)
        factor = torch.exp(self.gamma * log_one_minus_p)  # (1 - p)^γ
        # d/du [-(1 - e^u)^γ u] = -(1 - p)^γ + γ u p (1 - p)^(γ - 1)
        return -factor + self.gamma * u * torch.exp(u + (self.gamma - 1.0) * log_one_minus_p)


@dataclass(frozen=True)
class Poly1Term(TargetTerm):
    r"""Cross-entropy plus :math:`\epsilon (1 - p_t)`, :math:`p_t = (1 - \varepsilon) p_y + \varepsilon / C`
    (Leng et al., 2022)."""

    epsilon: float = 1.0
    name: str = field(default="poly1", init=False)
    PARAMETERS: ClassVar[tuple[str, ...]] = ("epsilon",)

    def value(self, u: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
        p_t = (1.0 - smoothing) * torch.exp(u) + smoothing / num_classes
        return -(1.0 - smoothing) * u + self.epsilon * (1.0 - p_t)

    def derivative(self, u: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
        return -(1.0 - smoothing) * (1.0 + self.epsilon * torch.exp(u))


@dataclass(frozen=True)
class GeneralizedTerm(TargetTerm):
    r""":math:`\psi(u) = (1 - e^{q u}) / q` (Zhang & Sabuncu, 2018)."""

    q: float = 0.7
    name: str = field(default="generalized", init=False)
    PARAMETERS: ClassVar[tuple[str, ...]] = ("q",)

    def value(self, u: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
        return -torch.expm1(self.q * u) / self.q

    def derivative(self, u: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
        return -torch.exp(self.q * u)


@dataclass(frozen=True)
class SymmetricTerm(TargetTerm):
    r""":math:`\psi(u) = -\alpha u - \beta A (1 - e^u)` (Wang et al., 2019), :math:`A` the clamped :math:`\log 0`."""

    alpha: float = 0.1
    beta: float = 1.0
    log_zero: float = -4.0
    name: str = field(default="symmetric", init=False)
    PARAMETERS: ClassVar[tuple[str, ...]] = ("alpha", "beta", "log_zero")

    def value(self, u: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
        return -self.alpha * u - self.beta * self.log_zero * _one_minus_exp(u)

    def derivative(self, u: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
        return -self.alpha + self.beta * self.log_zero * torch.exp(u)


# every term by its name, for rebuilding one from a custom operator's arguments
TERMS: dict[str, type[TargetTerm]] = {
    term.name: type(term) for term in (TargetTerm(), FocalTerm(), Poly1Term(), GeneralizedTerm(), SymmetricTerm())
}


def make_term(name: str, parameters: list[float]) -> TargetTerm:
    """The term of that name with those parameters (see :meth:`TargetTerm.parameters`)."""
    return TERMS[name](*parameters)


@dataclass(frozen=True)
class RowLoss:
    """The description of a row loss (see the module docstring), bundled so that kernels take one argument.

    Tensors are already checked: ``weight``, ``alpha``, ``class_offset`` and ``target_margin`` have shape ``(C,)``,
    ``token_weight`` ``(M,)`` (the canonical rows). The defaults describe plain cross-entropy.
    """

    weight: torch.Tensor | None = None
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    # None stands for cross-entropy's term, made in __post_init__: torch.compile can neither wrap a shared default
    # object nor call a dataclass's default factory
    term: TargetTerm = None  # type: ignore[assignment]
    alpha: torch.Tensor | None = None
    token_weight: torch.Tensor | None = None
    class_offset: torch.Tensor | None = None
    target_margin: torch.Tensor | None = None
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.term is None:
            object.__setattr__(self, "term", TargetTerm())


def mean_denominator(target: torch.Tensor, options: RowLoss, dtype: torch.dtype) -> torch.Tensor:
    """What ``reduction="mean"`` divides by: Σ r_n w_y over non-ignored targets, or Σ r_n for probabilities."""
    token_weight = None if options.token_weight is None else options.token_weight.to(dtype)
    if target.is_floating_point():
        if token_weight is not None:
            return token_weight.sum()
        return torch.tensor(target.shape[0], dtype=dtype, device=target.device)
    valid = target != options.ignore_index
    row_weight = valid.to(dtype)
    if options.weight is not None:
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        row_weight = row_weight * options.weight.to(dtype)[safe_target]
    if token_weight is not None:
        row_weight = row_weight * token_weight
    return row_weight.sum()
