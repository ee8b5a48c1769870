"""The fused family: one entry per softmax loss the kernels fuse, and the one check of a fused call.

A loss of the family is a row-loss description (:class:`~xent.core.rowloss.RowLoss`) built from its own options by
its ``describe_*`` function; the kernels need nothing else. Everything that offers "any loss of the family" reads
:data:`FAMILY`: :func:`xent.linear_loss`, :class:`xent.nn.LinearLoss` and the loss modules' constructors, the
Hugging Face patch (:mod:`xent.hf`), the vocab-parallel losses (:mod:`xent.distributed`), ``xent bench --loss`` and
the tests' family-wide guarantees. Adding a loss to the family is its function, its ``describe_*``, its module —
and one entry here.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from xent.core.rowloss import RowLoss
from xent.losses import checks, focal, imbalance, robust
from xent.losses.softmax import cross_entropy, describe_cross_entropy


@dataclass(frozen=True)
class FamilyLoss:
    """One loss of the fused family.

    Attributes:
        name: the public function's name (``"focal_loss"``), which ``loss=`` arguments also accept.
        function: the public function (:func:`xent.focal_loss`).
        describe: ``describe(num_classes, **own_options) -> RowLoss``: the loss's own options, checked, as the
            fields of the row-loss description they set.
        module_name: its :mod:`xent.nn` module (``"FocalLoss"``); :attr:`module` is the class.
        options: the loss's own options by name — the keyword arguments of ``describe``.
    """

    name: str
    function: Callable[..., torch.Tensor]
    describe: Callable[..., RowLoss]
    module_name: str
    options: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        own = frozenset(inspect.signature(self.describe).parameters) - {"num_classes"}
        object.__setattr__(self, "options", own)

    @property
    def module(self) -> type[torch.nn.Module]:
        import xent.nn  # xent.nn imports the losses: looked up when asked

        return getattr(xent.nn, self.module_name)  # type: ignore[no-any-return]

    @property
    def caps_itself(self) -> bool:
        """Whether ``softcap`` is one of the loss's own options (cross-entropy's); the others read capped logits."""
        return "softcap" in self.options

    @property
    def takes_probabilities(self) -> bool:
        """Whether the loss takes probability targets besides class indices."""
        return self.function is cross_entropy

    def check_names(self, options: Iterable[str], *, also: Iterable[str] = ()) -> None:
        """Refuse an option the loss does not have, naming the ones it has and ``also`` (the caller's own)."""
        also = set(also)
        unknown = sorted(set(options) - self.options - also)
        if unknown:
            shown = ", ".join(sorted(self.options | also))
            raise TypeError(f"{self.name} has no option {unknown[0]!r}; its options: {shown}")

    def check_values(self, options: Mapping[str, object]) -> None:
        """Check the values of the loss's own options before the vocabulary is known, as a module's constructor
        does: the number of classes is taken from a per-class option (class counts, a per-class α) when there is
        one. Options that are not the loss's own are left alone."""
        own = {key: value for key, value in options.items() if key in self.options}
        per_class = [len(value) for value in own.values() if isinstance(value, (list, tuple))
                     or (isinstance(value, torch.Tensor) and value.dim() > 0)]  # fmt: skip
        self.describe(per_class[0] if per_class else 1, **own)

    def description(
        self,
        num_classes: int,
        options: Mapping[str, object],
        *,
        softcap: float | None,
        ignore_index: int,
        token_weight: torch.Tensor | None = None,
    ) -> RowLoss:
        """The loss's row-loss description over ``num_classes`` classes: its own ``options`` (checked by
        ``describe``), the cap of the logits and the options every loss shares (``weight`` is checked with the
        target, :func:`xent.losses.softmax.checked_options`)."""
        own = {**options, "softcap": softcap} if self.caps_itself else dict(options)
        described = self.describe(num_classes, **own)
        return dataclasses.replace(described, softcap=softcap, ignore_index=ignore_index, token_weight=token_weight)


def _entries(*entries: FamilyLoss) -> dict[str, FamilyLoss]:
    return {entry.name: entry for entry in entries}


FAMILY: Mapping[str, FamilyLoss] = _entries(
    FamilyLoss("cross_entropy", cross_entropy, describe_cross_entropy, "CrossEntropyLoss"),
    FamilyLoss("focal_loss", focal.focal_loss, focal.describe_focal, "FocalLoss"),
    FamilyLoss("poly1_cross_entropy", focal.poly1_cross_entropy, focal.describe_poly1, "Poly1CrossEntropyLoss"),
    FamilyLoss(
        "generalized_cross_entropy",
        robust.generalized_cross_entropy,
        robust.describe_generalized,
        "GeneralizedCrossEntropyLoss",
    ),
    FamilyLoss(
        "symmetric_cross_entropy",
        robust.symmetric_cross_entropy,
        robust.describe_symmetric,
        "SymmetricCrossEntropyLoss",
    ),
    FamilyLoss(
        "logit_adjusted_cross_entropy",
        imbalance.logit_adjusted_cross_entropy,
        imbalance.describe_logit_adjusted,
        "LogitAdjustedCrossEntropyLoss",
    ),
    FamilyLoss(
        "balanced_softmax_cross_entropy",
        imbalance.balanced_softmax_cross_entropy,
        imbalance.describe_balanced_softmax,
        "BalancedSoftmaxCrossEntropyLoss",
    ),
    FamilyLoss("ldam_loss", imbalance.ldam_loss, imbalance.describe_ldam, "LDAMLoss"),
)


def family_loss(loss: object) -> FamilyLoss:
    """The entry of ``loss``: a loss of the family, its name, or its entry."""
    if isinstance(loss, FamilyLoss):
        return loss
    names = ", ".join(FAMILY)
    if isinstance(loss, str):
        if loss not in FAMILY:
            raise ValueError(f"loss must be one of {names} (or the function itself), got {loss!r}")
        return FAMILY[loss]
    for entry in FAMILY.values():
        if loss is entry.function:
            return entry
    shown = getattr(loss, "__name__", type(loss).__name__)
    raise TypeError(
        f"loss must be an index-target softmax loss of xent that the kernels fuse ({names}), got {shown}; "
        "binary, distillation and other losses have no fused linear form"
    )


def entry_of_function(function: Callable[..., torch.Tensor]) -> FamilyLoss | None:
    """The entry whose public function is ``function``, or None for a loss outside the family."""
    return next((entry for entry in FAMILY.values() if entry.function is function), None)


def check_fused_call(
    entry: FamilyLoss,
    options: Iterable[str],
    *,
    softcap: object = None,
    chunk_size: int | None = None,
    weight_grad_dtype: object = None,
    also: Iterable[str] = (),
) -> float | None:
    """The checks of a fused call that need no tensor, in one place: the loss's option names (``also``: names the
    caller accepts besides them), the soft cap, the chunk size and the weight gradient's dtype. The values of the
    loss's own options are checked by its description. Returns the cap as a float, or None."""
    entry.check_names(options, also=also)
    checks.check_chunk_size(chunk_size)
    if weight_grad_dtype is not None and not isinstance(weight_grad_dtype, torch.dtype):
        raise TypeError(f"weight_grad_dtype must be a torch.dtype or None, got {weight_grad_dtype!r}")
    if weight_grad_dtype is not None and not weight_grad_dtype.is_floating_point:
        raise ValueError(f"weight_grad_dtype must be a floating-point dtype, got {weight_grad_dtype}")
    if softcap is None:
        return None
    return checks.check_in_range("softcap", softcap, 0.0, low_inclusive=False)
