"""One :class:`torch.nn.Module` per functional loss: the constructor stores the options, ``forward`` is one call.

Tensor options (``weight``, ``pos_weight``, ``alpha``, ``class_counts``) are registered as buffers, so they follow
``module.to(device)`` and are saved in ``state_dict``; the others are plain attributes shown in ``repr``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from xent import losses
from xent.losses import combine, distill, focal, generative, sigmoid, softmax
from xent.losses.checks import check_reduction_and_ignore_index
from xent.losses.family import entry_of_function, family_loss

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "BalancedSoftmaxCrossEntropyLoss",
    "CrossEntropyLoss",
    "DistillationLoss",
    "FocalLoss",
    "GANDiscriminatorLoss",
    "GANGeneratorLoss",
    "GeneralizedCrossEntropyLoss",
    "LDAMLoss",
    "LinearCrossEntropyLoss",
    "LinearLoss",
    "LogitAdjustedCrossEntropyLoss",
    "Poly1CrossEntropyLoss",
    "SigmoidFocalLoss",
    "SymmetricCrossEntropyLoss",
    "VAELoss",
    "WeightedSum",
]


def _check_shared_options(options: Mapping[str, Any]) -> None:
    """The reduction and ignore_index of a softmax loss, as its function checks them."""
    check_reduction_and_ignore_index(options.get("reduction", "mean"), options.get("ignore_index", -100))


class _Loss(torch.nn.Module):
    """Stores options and forwards every call to :attr:`function` with them; a loss of the fused family
    (:data:`xent.losses.family.FAMILY`) has its options checked at construction, with the function's messages."""

    function: Callable[..., torch.Tensor]
    tensor_options: tuple[str, ...] = ("weight",)

    def __init__(self, **options: object) -> None:
        super().__init__()
        entry = entry_of_function(type(self).function)
        if entry is not None:
            _check_shared_options(options)
            entry.check_values(options)
        self._option_names = tuple(options)
        for name, value in options.items():
            if name in self.tensor_options and (value is None or isinstance(value, torch.Tensor)):
                self.register_buffer(name, value)
            elif name in self.tensor_options and isinstance(value, Sequence) and not isinstance(value, str):
                try:
                    self.register_buffer(name, torch.as_tensor(value, dtype=torch.float64))
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"{name} must be a tensor or a sequence of numbers, got {value!r}") from None
            else:
                setattr(self, name, value)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        options = {name: getattr(self, name) for name in self._option_names}
        return type(self).function(*inputs, **options)

    def extra_repr(self) -> str:
        shown = (name for name in self._option_names if name not in self.tensor_options)
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)


class CrossEntropyLoss(_Loss):
    """Module form of :func:`xent.cross_entropy`; see there for the formula, shapes and options.

    Shape:
        - Input: ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        - Target: class indices ``()``, ``(N)`` or ``(N, d1, ..., dK)``, or probabilities of the input's shape.
        - Output: ``()``, or the target's batch shape with ``reduction="none"``.

    Example:
        >>> loss_fn = xent.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> loss = loss_fn(torch.randn(8, 5, requires_grad=True), torch.randint(5, (8,)))
        >>> loss.backward()
    """

    function = staticmethod(losses.cross_entropy)

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        label_smoothing, z_loss, softcap = softmax.check_softmax_options(
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            ignore_index=ignore_index,
        )
        super().__init__(
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )


class BCEWithLogitsLoss(_Loss):
    """Module form of :func:`xent.binary_cross_entropy_with_logits`; see there for the formula and options.

    Shape:
        - Input: any shape. Target: the input's shape. Output: ``()``, or the input's shape with ``"none"``.
    """

    function = staticmethod(losses.binary_cross_entropy_with_logits)
    tensor_options = ("weight", "pos_weight")

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        pos_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        label_smoothing = sigmoid.check_binary_options(reduction=reduction, label_smoothing=label_smoothing)
        super().__init__(weight=weight, pos_weight=pos_weight, reduction=reduction, label_smoothing=label_smoothing)


class BCELoss(_Loss):
    """Module form of :func:`xent.binary_cross_entropy` (input: probabilities). Prefer :class:`BCEWithLogitsLoss`.

    Shape:
        - Input: any shape. Target: the input's shape. Output: ``()``, or the input's shape with ``"none"``.
    """

    function = staticmethod(losses.binary_cross_entropy)

    def __init__(self, weight: torch.Tensor | None = None, reduction: str = "mean", label_smoothing: float = 0.0):
        label_smoothing = sigmoid.check_binary_options(reduction=reduction, label_smoothing=label_smoothing)
        super().__init__(weight=weight, reduction=reduction, label_smoothing=label_smoothing)


class LinearLoss(torch.nn.Module):
    """Module form of :func:`xent.linear_loss`: ``forward(input, linear_weight, target, linear_bias=None)``.

    Stores the loss (a function of the family or its name) and its options; the head's weight and bias belong to
    the model and are arguments of ``forward``. Options are checked at construction, as the function checks them.

    Example:
        >>> lm_head = torch.nn.Linear(64, 1000, bias=False)                   # a model's output layer
        >>> hidden, tokens = torch.randn(2, 16, 64), torch.randint(1000, (2, 16))
        >>> criterion = xent.nn.LinearLoss(xent.focal_loss, gamma=2.0)
        >>> criterion(hidden, lm_head.weight, tokens).backward()             # lm_head.weight.grad is set
    """

    def __init__(self, loss: Callable[..., torch.Tensor] | str, **options: object) -> None:
        super().__init__()
        entry = family_loss(loss)
        self.loss_name, self._option_names = entry.name, tuple(options)
        for key, value in options.items():  # tensors are buffers: they follow .to(device) and the state_dict
            if isinstance(value, torch.Tensor):
                self.register_buffer(key, value)
            else:
                setattr(self, key, value)
        # the loss's own options, the reduction and ignore_index are checked now; weight etc. with the tensors
        _check_shared_options(options)
        entry.check_values(options)

    def forward(
        self,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        target: torch.Tensor,
        linear_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return losses.linear_loss(self.loss_name, input, linear_weight, target, linear_bias=linear_bias, **self.options)

    @property
    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        shown = [f"{key}={value!r}" for key, value in self.options.items() if not isinstance(value, torch.Tensor)]
        return ", ".join([self.loss_name, *shown])


class LinearCrossEntropyLoss(LinearLoss):
    """Module form of :func:`xent.linear_cross_entropy`: ``forward(input, linear_weight, target, linear_bias=None)``.

    The head's weight and bias are arguments of ``forward`` (they belong to the model); the module stores the loss
    options: those of :class:`CrossEntropyLoss`, ``chunk_size`` and ``weight_grad_dtype``.

    Example:
        >>> lm_head = torch.nn.Linear(64, 1000, bias=False)                   # a model's output layer
        >>> hidden, tokens = torch.randn(2, 16, 64), torch.randint(1000, (2, 16))
        >>> criterion = xent.nn.LinearCrossEntropyLoss(z_loss=1e-4)
        >>> loss = criterion(hidden, lm_head.weight, tokens)                 # = CrossEntropyLoss of lm_head(hidden)
        >>> torch.testing.assert_close(loss, xent.nn.CrossEntropyLoss(z_loss=1e-4)(lm_head(hidden).flatten(0, 1),
        ...                                                                  tokens.flatten()))
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        weight_grad_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            "cross_entropy",
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            chunk_size=chunk_size,
            weight_grad_dtype=weight_grad_dtype,
        )


class FocalLoss(_Loss):
    """Module form of :func:`xent.focal_loss` (softmax focal loss, Lin et al., 2017)."""

    function = staticmethod(losses.focal_loss)
    tensor_options = ("weight", "alpha")

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(gamma=gamma, alpha=alpha, weight=weight, ignore_index=ignore_index, reduction=reduction)


class SigmoidFocalLoss(_Loss):
    """Module form of :func:`xent.sigmoid_focal_loss` (binary / multi-label focal loss, Lin et al., 2017)."""

    function = staticmethod(losses.sigmoid_focal_loss)

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25, reduction: str = "mean") -> None:
        gamma, alpha = focal.check_sigmoid_focal_options(gamma=gamma, alpha=alpha, reduction=reduction)
        super().__init__(gamma=gamma, alpha=alpha, reduction=reduction)


class Poly1CrossEntropyLoss(_Loss):
    """Module form of :func:`xent.poly1_cross_entropy` (Leng et al., 2022)."""

    function = staticmethod(losses.poly1_cross_entropy)

    def __init__(
        self,
        epsilon: float = 1.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            epsilon=epsilon,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )


class LogitAdjustedCrossEntropyLoss(_Loss):
    """Module form of :func:`xent.logit_adjusted_cross_entropy` (Menon et al., 2021)."""

    function = staticmethod(losses.logit_adjusted_cross_entropy)
    tensor_options = ("weight", "class_counts")

    def __init__(
        self,
        class_counts: torch.Tensor | Sequence[float],
        tau: float = 1.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            class_counts=class_counts,
            tau=tau,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )


class BalancedSoftmaxCrossEntropyLoss(_Loss):
    """Module form of :func:`xent.balanced_softmax_cross_entropy` (Ren et al., 2020)."""

    function = staticmethod(losses.balanced_softmax_cross_entropy)
    tensor_options = ("weight", "class_counts")

    def __init__(
        self,
        class_counts: torch.Tensor | Sequence[float],
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            class_counts=class_counts,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )


class LDAMLoss(_Loss):
    """Module form of :func:`xent.ldam_loss` (Cao et al., 2019). For LDAM-DRW, assign ``module.weight`` from
    :func:`xent.deferred_reweighting` at the start of each epoch."""

    function = staticmethod(losses.ldam_loss)
    tensor_options = ("weight", "class_counts")

    def __init__(
        self,
        class_counts: torch.Tensor | Sequence[float],
        max_margin: float = 0.5,
        scale: float = 30.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            class_counts=class_counts,
            max_margin=max_margin,
            scale=scale,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
        )


class GeneralizedCrossEntropyLoss(_Loss):
    """Module form of :func:`xent.generalized_cross_entropy` (Zhang & Sabuncu, 2018)."""

    function = staticmethod(losses.generalized_cross_entropy)

    def __init__(
        self, q: float = 0.7, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean"
    ) -> None:
        super().__init__(q=q, weight=weight, ignore_index=ignore_index, reduction=reduction)


class SymmetricCrossEntropyLoss(_Loss):
    """Module form of :func:`xent.symmetric_cross_entropy` (Wang et al., 2019)."""

    function = staticmethod(losses.symmetric_cross_entropy)

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 1.0,
        log_zero: float = -4.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            alpha=alpha, beta=beta, log_zero=log_zero, weight=weight, ignore_index=ignore_index, reduction=reduction
        )


class DistillationLoss(_Loss):
    """Module form of :func:`xent.distillation_loss` (Hinton et al., 2015): ``forward(student_logits, teacher)``."""

    function = staticmethod(losses.distillation_loss)

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", teacher_is_probs: bool = False):
        temperature = distill.check_distillation_options(temperature=temperature, reduction=reduction)
        super().__init__(temperature=temperature, reduction=reduction, teacher_is_probs=teacher_is_probs)


class GANDiscriminatorLoss(_Loss):
    """Module form of :func:`xent.gan_discriminator_loss`: ``forward(real_logits, fake_logits)``."""

    function = staticmethod(losses.gan_discriminator_loss)

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        label_smoothing = generative.check_gan_options(
            reduction=reduction, label_smoothing=label_smoothing, discriminator=True
        )
        super().__init__(label_smoothing=label_smoothing, reduction=reduction)


class GANGeneratorLoss(_Loss):
    """Module form of :func:`xent.gan_generator_loss` (non-saturating): ``forward(fake_logits)``."""

    function = staticmethod(losses.gan_generator_loss)

    def __init__(self, reduction: str = "mean") -> None:
        generative.check_gan_options(reduction=reduction)
        super().__init__(reduction=reduction)


class VAELoss(_Loss):
    """Module form of :func:`xent.vae_loss`: ``forward(recon_logits, x, mu, logvar)``."""

    function = staticmethod(losses.vae_loss)

    def __init__(self, beta: float = 1.0, reduction: str = "sum") -> None:
        beta = generative.check_vae_options(beta=beta, reduction=reduction)
        super().__init__(beta=beta, reduction=reduction)


class WeightedSum(torch.nn.Module):
    r"""A weighted sum :math:`\sum_k \lambda_k \mathcal{L}_k` of named losses that take the same inputs.

    Every call computes each term on the same arguments and keeps their values (detached) in ``last_terms``
    for logging. For terms with different inputs use :func:`xent.weighted_sum`.

    Example:
        >>> criterion = xent.nn.WeightedSum({"ce": (1.0, xent.nn.CrossEntropyLoss()),
        ...                                  "focal": (0.5, xent.nn.FocalLoss(gamma=2.0))})
        >>> logits, target = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]]), torch.tensor([0, 1])
        >>> criterion(logits, target)
        tensor(2.3761)
        >>> criterion.last_terms
        {'ce': tensor(1.6681), 'focal': tensor(1.4160)}

    Args:
        terms: by name, a pair (weight, loss); losses that are Modules are registered as sub-modules, so their
            buffers follow ``.to(device)``.
    """

    def __init__(self, terms: Mapping[str, tuple[float, Callable[..., torch.Tensor]]]) -> None:
        super().__init__()
        combine.check_mapping("terms", terms)
        if not terms:
            raise ValueError("terms must name at least one loss")
        for name, term in terms.items():
            if not (isinstance(term, tuple) and len(term) == 2 and callable(term[1])):
                raise TypeError(f"terms[{name!r}] must be a pair (weight, loss) with a callable loss, got {term!r}")
        self.weights = combine.check_term_weights({name: weight for name, (weight, _) in terms.items()})
        self.losses = torch.nn.ModuleDict(
            {name: fn for name, (_, fn) in terms.items() if isinstance(fn, torch.nn.Module)}
        )
        self._functions = {name: fn for name, (_, fn) in terms.items() if not isinstance(fn, torch.nn.Module)}
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named: tuple[tuple[str, Callable[..., torch.Tensor]], ...] = (*self.losses.items(), *self._functions.items())
        terms = {name: fn(*inputs) for name, fn in named}
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return combine.weighted_sum(terms, self.weights)

    def extra_repr(self) -> str:
        return f"weights={self.weights!r}"
