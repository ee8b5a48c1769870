"""transformers' causal-LM loss on xent's fused linear losses, for :mod:`xent.integrations.hf`: what runs in a patched
model's fused step between its output embeddings and its loss.

:class:`HeadOutput` is what the patched head returns in place of the logits — the hidden states, and the scales and
soft cap the model applies on the way to its loss; :class:`FusedLoss` is the loss and options :func:`xent.hf.patch`
was given, checked once, and computes transformers' causal-LM loss of a :class:`HeadOutput` (the label shift,
``ignore_index``, ``num_items_in_batch``) without forming the logits; :func:`check_labels` refuses labels that
loss would misread, naming them.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xent._config import value_checks_enabled, values_checked
from xent.distributed.vocab_parallel import vocab_parallel_linear_loss
from xent.integrations.heads import LinearHead, refuse_partitioned
from xent.losses import checks
from xent.losses.checks import is_dtensor
from xent.losses.family import check_fused_call, family_loss
from xent.losses.linear import accumulated_linear_loss


class HeadOutput:
    """What a patched model's output embeddings return during a fused step, in place of the logits: the hidden
    states, and the elementwise steps the model applies to the logits before its loss.

    ``head`` is anything with the ``weight`` ``(V, D)`` and ``bias`` of the logits ``hidden @ weight.T + bias``: the
    output embeddings (an ``nn.Linear``), or for a LoRA head the weight and hidden states widened by the update's
    rank.

    A scalar multiplication or division and ``tanh`` are recorded (they are what logit scales and soft caps are made
    of); ``float()``, ``to(dtype)`` and ``contiguous()`` change nothing (the loss is computed in float32);
    ``device``, ``shape``, ``size()`` and ``dim()`` answer as the logits would. Any other use raises TypeError naming
    the model and the operation: its logits would be needed, and xent.hf will not form them silently.
    """

    def __init__(
        self, model_name: str, hidden: torch.Tensor, head: LinearHead, steps: tuple[tuple[Any, ...], ...] = ()
    ) -> None:
        self.model_name, self.hidden, self.head, self.steps = model_name, hidden, head, steps

    def _then(self, step: tuple[Any, ...]) -> HeadOutput:
        return HeadOutput(self.model_name, self.hidden, self.head, (*self.steps, step))

    def _refuse(self, operation: str) -> TypeError:
        return TypeError(
            f"{self.model_name} applies {operation} to its logits between the output embeddings and the loss; "
            "xent.hf fuses a head whose logits reach self.loss_function unchanged but for scales and tanh soft caps "
            "(a model that computes its loss itself is not fused). Call xent.hf.unpatch(model) to train it unfused"
        )

    def _scalar(self, value: Any, operation: str) -> float:
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
            raise self._refuse(f"{operation} by {type(value).__name__} {value!r}")
        return float(value)

    def __mul__(self, other: Any) -> HeadOutput:
        return self._then(("mul", self._scalar(other, "a multiplication")))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> HeadOutput:
        return self._then(("div", self._scalar(other, "a division")))

    def tanh(self) -> HeadOutput:
        return self._then(("tanh",))

    def float(self) -> HeadOutput:
        return self

    def contiguous(self) -> HeadOutput:
        return self

    # What the logits would be, read without forming them (a model may move its labels to the logits' device).
    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.head.weight.shape[0]))

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.hidden.dim()

    def to(self, *args: Any, **kwargs: Any) -> HeadOutput:
        targets = [*args, *kwargs.values()]
        if all(isinstance(value, torch.dtype) and value.is_floating_point for value in targets):
            return self
        raise self._refuse(f".to({', '.join(map(repr, targets))})")

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func in (torch.tanh, torch.Tensor.tanh) and len(args) == 1 and not kwargs:
            return args[0].tanh()
        receiver = next(arg for arg in args if isinstance(arg, HeadOutput))
        raise receiver._refuse(getattr(func, "__name__", repr(func)))

    def __getattr__(self, name: str) -> Any:
        raise self._refuse(f"logits.{name}")

    def transform(self) -> tuple[builtins.float, builtins.float | None]:
        """The recorded steps as ``(scale, cap)``: logits ``cap · tanh(scale · z / cap)`` (``scale · z`` without a
        cap) of the head's logits ``z``. Scales are kept as ratios so that Gemma's ``/c, tanh, ·c`` gives exactly
        ``(1.0, c)``."""
        numerator = denominator = 1.0  # the running scale, before the tanh or outside it
        inner = None  # the scale inside the tanh, once there is one
        for step in self.steps:
            if step[0] == "mul":
                numerator *= step[1]
            elif step[0] == "div":
                denominator *= step[1]
            elif inner is not None:
                raise self._refuse("tanh twice")
            else:
                inner, numerator, denominator = (numerator, denominator), 1.0, 1.0
        if inner is None:
            return numerator / denominator, None
        cap = numerator / denominator
        if cap <= 0:
            raise self._refuse(f"a negative factor {cap} after tanh")
        # c·tanh(s·z) = c·tanh((c·s)·z / c): a cap c on logits scaled by c·s
        return (numerator * inner[0]) / (denominator * inner[1]), cap

    # The operators a model might apply to logits that are not scales: refused by name rather than by Python's
    # generic "unsupported operand" error.
    def __add__(self, other: Any) -> HeadOutput:
        raise self._refuse("an addition")

    __radd__ = __sub__ = __rsub__ = __add__

    def __getitem__(self, index: Any) -> HeadOutput:
        raise self._refuse(f"indexing [{index!r}]")


@dataclass(frozen=True)
class FusedLoss:
    """The loss :func:`xent.hf.patch` computes: a fused loss of xent and its options, checked once."""

    loss: Any
    options: dict[str, Any]

    # Options of the fused path itself; the rest are the loss's own (checked by its description).
    PATH_OPTIONS = ("chunk_size", "impl", "weight_grad_dtype", "weight")

    @classmethod
    def build(cls, loss: Any, options: dict[str, Any]) -> FusedLoss:
        entry = family_loss("cross_entropy" if loss is None else loss)
        for reserved in ("ignore_index", "reduction", "linear_bias"):
            if reserved in options:
                raise TypeError(
                    f"{reserved} is the model's to set (transformers' causal-LM loss decides it), not a loss option"
                )
        own = {key: value for key, value in options.items() if key not in (*cls.PATH_OPTIONS, "softcap")}
        check_fused_call(  # every fused loss takes a cap (xent.linear_loss)
            entry,
            own,
            softcap=options.get("softcap"),
            chunk_size=options.get("chunk_size"),
            weight_grad_dtype=options.get("weight_grad_dtype"),
            also=("softcap", *cls.PATH_OPTIONS),
        )
        entry.check_values(own)
        return cls(entry.function, dict(options))

    def __call__(
        self, hidden: torch.Tensor, head: LinearHead, target: torch.Tensor, ignore_index: int, reduction: str, cap: Any
    ) -> torch.Tensor:
        options = dict(self.options)
        own_cap = options.pop("softcap", None)
        if cap is not None and own_cap is not None:
            raise ValueError(f"the model caps its logits at {cap}; softcap={own_cap} would cap them twice")
        if is_dtensor(head.weight):  # a tensor-parallel head: each rank its rows of the vocabulary, never gathered
            unsupported = [name for name in ("impl", "weight_grad_dtype", "weight") if options.get(name) is not None]
            if unsupported:
                raise TypeError(
                    f"{', '.join(unsupported)} cannot be given for a tensor-parallel head (its weight a DTensor): the "
                    "vocab-parallel loss has one implementation and reads the rank's rows of the head only"
                )
            return vocab_parallel_linear_loss(
                self.loss, hidden.full_tensor() if is_dtensor(hidden) else hidden, head.weight, target,
                linear_bias_shard=head.bias, chunk_size=options.pop("chunk_size", None), ignore_index=ignore_index,
                reduction=reduction, softcap=own_cap if cap is None else cap,
                **{key: value for key, value in options.items() if key not in self.PATH_OPTIONS},
            )  # fmt: skip
        return accumulated_linear_loss(
            self.loss,
            hidden,
            head.weight,
            target,
            linear_bias=head.bias,
            chunk_size=options.pop("chunk_size", None),
            weight_grad_dtype=options.pop("weight_grad_dtype", None),
            impl=options.pop("impl", None),
            weight=options.pop("weight", None),
            token_weight=None,
            ignore_index=ignore_index,
            reduction=reduction,
            softcap=own_cap if cap is None else cap,
            **options,
        )

    def causal_lm_loss(
        self,
        logits: HeadOutput,
        labels: torch.Tensor,
        shift_labels: torch.Tensor | None,
        vocab_size: int,
        num_items_in_batch: Any,
        ignore_index: int,
    ) -> torch.Tensor:
        """transformers' causal-LM loss of the head's logits, fused: the labels shifted by one (or ``shift_labels``
        as given), ``ignore_index``, the mean over the kept tokens or, with ``num_items_in_batch``, their sum divided
        by it. The labels are checked (:func:`check_labels`); their values are checked here, naming them."""
        named = "labels" if shift_labels is None else "shift_labels"
        model_name, hidden, head = logits.model_name, logits.hidden, logits.head
        refuse_partitioned(head.weight, model_name, "Call xent.hf.unpatch(model) to train it unfused under ZeRO-3")
        if head.weight.shape[0] != vocab_size:
            raise TypeError(
                f"{model_name}'s head has {head.weight.shape[0]} outputs but its loss reads {vocab_size} classes"
            )
        if shift_labels is None:
            labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        target = shift_labels.reshape(-1).to(hidden.device)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if value_checks_enabled(target) and target.numel():
            bad = ((target < 0) | (target >= vocab_size)) & (target != ignore_index)
            if bool(bad.any()):  # a host sync, as every value check
                raise ValueError(
                    f"{named} hold token id {int(target[bad][0])}, outside [0, {vocab_size}) for "
                    f"{model_name}'s vocabulary of {vocab_size} (and not ignore_index={ignore_index})"
                )
        scale, cap = logits.transform()
        if scale != 1.0:
            if head.bias is not None:  # s·(x Wᵀ + b) is not (s·x) Wᵀ + b
                raise logits._refuse("a logit scale to a head with a bias")
            hidden = hidden * scale  # s·(x Wᵀ) = (s·x) Wᵀ
        reduction = "mean" if num_items_in_batch is None else "sum"
        with values_checked():  # checked above, naming the labels: not again inside the loss
            loss: torch.Tensor = self(hidden, head, target, ignore_index, reduction, cap)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss


def check_labels(
    name: str, labels: Any, positions: torch.Size, *, model_name: str, given: tuple[str, torch.Size] | None
) -> torch.Tensor:
    """``labels`` (or ``shift_labels``) as transformers' causal-LM loss reads them: integer token ids, one per
    position of the logits — the input's shape — named as the user passed them (not as the flattened target).
    ``given`` is the forward's ``input_ids`` or ``inputs_embeds`` as ``(name, shape)``, if it had one."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids, got {type(labels).__name__}")
    shown = checks.shape_str(labels.shape)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(
            f"{name} of shape {shown} must hold token ids (an integer dtype), got {labels.dtype} (use {name}.long())"
        )
    if labels.shape == positions:
        return labels
    expected = None if given is None else given[1] if given[0] == "input_ids" else given[1][:-1]
    if given is not None and expected == positions:
        raise ValueError(
            f"{name} has shape {shown} but {given[0]} has shape {checks.shape_str(given[1])}; "
            f"{model_name}'s loss takes {name} of shape {checks.shape_str(positions)}, one token id per position"
        )
    if expected is not None:  # the model kept fewer positions than its input has
        raise ValueError(
            f"{model_name} kept {positions.numel()} positions for the loss (logits_to_keep?) but {name} "
            f"has shape {shown}"
        )
    raise ValueError(
        f"{name} has shape {shown} but {model_name}'s logits have positions of shape "
        f"{checks.shape_str(positions)}; its loss takes one token id per position"
    )
