"""Hugging Face causal language models on xent's fused linear losses: :func:`patch` one model instance, and its
training steps never form the ``N × V`` logits.

How it works, for any ``*ForCausalLM`` of the standard layout (base model → last hidden state → output embeddings →
``self.loss_function``)::

    model.forward (patched)       decides: a training step (labels, gradients on) or skip_logits=True?
      └ the model's own forward   runs unchanged, so everything it does besides the head is its own
          lm_head(hidden)         returns a HeadOutput — the hidden states, not the logits
          logits / c, tanh, * c   a HeadOutput records each elementwise step (Gemma's softcap, Cohere's and
                                  Granite's scales); any other operation raises TypeError naming the model
          self.loss_function(…)   the fused loss of the head: softcap and scale from the recorded steps, the
                                  label shift, shift_labels, ignore_index and num_items_in_batch as transformers
          loss += aux             MoE auxiliary losses, added by the model as always
      └ outputs.logits = None

Nothing is copied from a model class: the steps between the head and the loss are read from what the forward does
(its config's ``final_logit_softcapping``, ``logit_scale`` or ``logits_scaling`` are what they carry), so a new
model type either runs exactly or is refused with a TypeError — it is never left silently unfused. Everything is
per instance: :func:`unpatch` deletes what :func:`patch` set.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

try:
    import transformers
    from transformers.loss.loss_utils import LOSS_MAPPING
except ImportError as error:  # pragma: no cover - exercised without the extra only
    raise ImportError('xent.hf needs transformers: pip install "xent[hf]"') from error

from xent._config import value_checks, value_checks_enabled
from xent.integrations.heads import LinearHead, causal_lm, head_parts, widen
from xent.losses import checks
from xent.losses.family import check_fused_call, family_loss
from xent.losses.linear import accumulated_linear_loss

__all__ = ["HeadOutput", "is_patched", "patch", "unpatch"]

_STATE = "_xent_patch"


def patch(model: nn.Module, *, loss: Any = None, **loss_options: Any) -> nn.Module:
    r"""Compute a causal LM's training loss with xent's fused linear loss: the logits are never formed.

    Patches ``model`` in place (this instance only) and returns it. When its forward gets ``labels`` with gradients
    enabled — a training step, whatever ``model.training`` says — the loss is computed from the hidden states that
    enter the output embeddings, chunk by chunk (:func:`xent.linear_loss`), and ``outputs.logits`` is ``None``.
    Otherwise (no labels, ``torch.no_grad()``, ``model.generate``) the model runs as unpatched and returns its
    logits; ``skip_logits=True`` in the forward call forces the fused loss (as an evaluation loop that needs only
    the loss would), ``skip_logits=False`` forces the logits.

    The loss equals the unpatched ``outputs.loss`` and every parameter gets the same gradient: the label shift (or
    ``shift_labels``), ``ignore_index`` (-100 by default), the mean over the kept tokens, or with
    ``num_items_in_batch=n`` (gradient accumulation, as ``transformers.Trainer`` passes it) the sum of the token
    losses divided by ``n``; a final logit soft cap (Gemma 2) or logit scale (Cohere, Granite) is applied inside
    the fused loss; tied input and output embeddings get the sum of both gradients; MoE auxiliary losses are added by
    the model itself. For half-precision models the head's products run in that precision and the loss in float32,
    as transformers upcasts the logits.

    ``labels`` (and ``shift_labels``) must hold integer token ids of the input's shape ``(B, T)``, as transformers'
    causal-LM loss reads them; any other shape or dtype is refused naming them (the unpatched model would shift
    ``(B, T, 1)`` labels along their last dimension and return NaN).

    With PEFT, the model may be patched before or after ``peft.get_peft_model``, and ``patch`` takes the PEFT model
    itself: a LoRA head (``target_modules`` with ``lm_head``) is fused exactly — ``x Wᵀ + s·B(A(dropout(x)))`` is one
    fused product of the hidden states widened by their rank-``r`` projection ``s·A(dropout(x))`` with the weight
    widened by ``B`` — and a head in ``modules_to_save`` is fused through its active copy. Other PEFT heads (DoRA and
    the other LoRA variants) are refused naming PEFT's class.

    Args:
        model: a Hugging Face ``*ForCausalLM`` instance (a ``PreTrainedModel`` whose output embeddings are an
            ``nn.Linear`` and whose loss is transformers' causal-LM loss through ``self.loss_function``), or a PEFT
            model of one (its base model is patched).
        loss: a fused softmax loss of xent (``xent.focal_loss``, or its name); ``None`` is cross-entropy.
        **loss_options: options of that loss and of the fused path: ``z_loss=1e-4``, ``label_smoothing=0.1``,
            ``weight=``, ``chunk_size=``, ``impl=``, ``gamma=2.0`` for ``xent.focal_loss``…

    Returns:
        ``model``, patched.

    Raises:
        TypeError: the model does not fit the layout (its class and the reason are named), or an option is unknown.
        ValueError: the model is already patched (:func:`unpatch` it first to change its loss or options), or its
            output embeddings are, through another model that shares them.

    Example:
        >>> import transformers
        >>> import xent.hf
        >>> config = transformers.LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
        ...                                   num_hidden_layers=1, num_attention_heads=4)
        >>> model = xent.hf.patch(transformers.AutoModelForCausalLM.from_config(config), z_loss=1e-4)
        >>> input_ids = torch.randint(1000, (2, 16))
        >>> model(input_ids, labels=input_ids).loss.backward()        # no N × V logits
        >>> xent.hf.is_patched(model)
        True
    """
    target = causal_lm(model)
    name = type(target).__name__
    if not isinstance(target, transformers.PreTrainedModel):
        raise TypeError(f"patch takes a Hugging Face PreTrainedModel or a PEFT model of one, got {name}")
    if is_patched(target):
        raise ValueError(
            f"{name} is already patched by xent.hf; call xent.hf.unpatch(model) first to patch it with other options"
        )
    fused = FusedLoss.build(loss, loss_options)
    head = target.get_output_embeddings()
    head_parts(head, name)  # refuses a head it cannot fuse, by its class
    if isinstance(head.__dict__.get("forward"), _HeadForward):
        raise ValueError(
            f"{name}'s output embeddings are already patched by xent.hf through another model that shares them; "
            "unpatch that model first"
        )
    forward = type(target).forward
    if "labels" not in inspect.signature(forward).parameters:
        raise TypeError(f"{name}.forward takes no labels: it is not a causal LM that computes its own loss")
    causal_lm_loss = LOSS_MAPPING["ForCausalLM"]
    if target.loss_function is not causal_lm_loss:
        shown = getattr(target.loss_function, "__name__", repr(target.loss_function))
        raise TypeError(f"{name} computes its loss with {shown}, not transformers' causal-LM loss (ForCausalLMLoss)")
    if _never_calls_loss_function(forward):
        raise TypeError(
            f"{name}.forward computes its loss itself: its source never calls self.loss_function (Bart-era decoders "
            "such as Marian's form their logits and call CrossEntropyLoss on logits.view(…)), so xent.hf cannot "
            "fuse it; train it unpatched"
        )
    state = _Patch(model_name=name, model=target, head=head, fused=fused, original_loss=causal_lm_loss)
    # Callable objects, not closures: a deep copy of the model (an EMA or a reference model) copies them with it and
    # they then drive the copy, and the model still pickles.
    state.install(target, "forward", _Forward(state, target.forward))
    state.install(head, "forward", _HeadForward(state, head, head.forward))
    state.install(target, "_loss_function", state.loss_function)  # what the loss_function property's setter sets
    setattr(target, _STATE, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the instance behaves and is stored exactly as before it (returns ``model``)."""
    target = causal_lm(model)
    state = target.__dict__.get(_STATE)
    if state is None:
        raise ValueError(f"{type(target).__name__} is not patched by xent.hf")
    for owner, attribute in list(state.saved):
        state.restore(owner, attribute)
    delattr(target, _STATE)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has patched this instance (or the model a PEFT model wraps)."""
    return _STATE in causal_lm(model).__dict__


@dataclass(frozen=True)
class FusedLoss:
    """The loss :func:`patch` computes: a fused loss of xent and its options, checked once."""

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

    # Under torch.compile the model is compiled and its loss runs eagerly: the fused kernels are chunk loops and
    # value checks that a graph would unroll or break on, at no gain.
    @torch.compiler.disable  # type: ignore[untyped-decorator]  # torch.compiler.disable is unannotated
    def __call__(
        self, hidden: torch.Tensor, head: LinearHead, target: torch.Tensor, ignore_index: int, reduction: str, cap: Any
    ) -> torch.Tensor:
        options = dict(self.options)
        own_cap = options.pop("softcap", None)
        if cap is not None and own_cap is not None:
            raise ValueError(f"the model caps its logits at {cap}; softcap={own_cap} would cap them twice")
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


@dataclass
class _Patch:
    """What :func:`patch` holds for one instance."""

    model_name: str
    model: transformers.PreTrainedModel = field(repr=False)
    head: nn.Module = field(repr=False)  # the output embeddings whose forward is patched
    fused: FusedLoss
    original_loss: Callable[..., torch.Tensor]
    saved: dict[tuple[Any, str], Any] = field(default_factory=dict)  # (owner, attribute) → what it held, or _ABSENT
    active: bool = False
    calls: int = 0
    consumed: int = 0
    input: tuple[str, torch.Size] | None = None  # the forward's input_ids or inputs_embeds: (name, shape)

    def install(self, owner: Any, attribute: str, value: Any) -> None:
        self.saved[owner, attribute] = owner.__dict__.get(attribute, _ABSENT)
        owner.__dict__[attribute] = value

    def restore(self, owner: Any, attribute: str) -> None:
        previous = self.saved.pop((owner, attribute))
        owner.__dict__.pop(attribute, None)
        if previous is not _ABSENT:
            owner.__dict__[attribute] = previous

    def follow_head(self) -> None:
        """Move the head's patch to the model's output embeddings if they changed since :func:`patch`: PEFT wraps
        the head (LoRA, modules_to_save) in a new module when the model is patched first."""
        head = self.model.get_output_embeddings()
        if head is self.head:
            return
        head_parts(head, self.model_name)  # refused before anything changes
        self.restore(self.head, "forward")
        for module in head.modules():  # PEFT's copies of the patched head (modules_to_save) become plain again
            copied = module.__dict__.get("forward")
            if isinstance(copied, _HeadForward) and copied.state is self:
                del module.__dict__["forward"]
                if getattr(copied.forward, "__func__", None) is not type(module).forward:
                    module.__dict__["forward"] = copied.forward
        self.install(head, "forward", _HeadForward(self, head, head.forward))
        self.head = head

    def run(self, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any], skip_logits: bool | None) -> Any:
        arguments = _bound(forward, args, kwargs)
        has_labels = arguments.get("labels") is not None
        self.input = next(
            (
                (name, arguments[name].shape)
                for name in ("input_ids", "inputs_embeds")
                if isinstance(arguments.get(name), torch.Tensor)
            ),
            None,
        )
        if skip_logits is None:
            skip_logits = has_labels and torch.is_grad_enabled()
        elif skip_logits and not has_labels:
            raise ValueError("skip_logits=True needs labels: without them the loss cannot be computed")
        if not skip_logits:
            return forward(*args, **kwargs)
        self.follow_head()
        self.active, self.calls, self.consumed = True, 0, 0
        try:
            outputs = forward(*args, **kwargs)
        finally:
            self.active = False
        if self.calls == 0:
            raise TypeError(
                f"{self.model_name}.forward did not call its output embeddings (get_output_embeddings()); "
                "xent.hf cannot fuse its loss"
            )
        if self.consumed != self.calls:
            raise TypeError(f"{self.model_name}.forward did not pass its head's logits to self.loss_function")
        return _without_logits(outputs)

    def check_labels(self, name: str, labels: Any, positions: torch.Size) -> torch.Tensor:
        """``labels`` (or ``shift_labels``) as transformers' causal-LM loss reads them: integer token ids, one per
        position of the logits — the input's shape — named as the user passed them (not as the flattened target)."""
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of token ids, got {type(labels).__name__}")
        shown = checks.shape_str(labels.shape)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(
                f"{name} of shape {shown} must hold token ids (an integer dtype), got {labels.dtype} "
                f"(use {name}.long())"
            )
        if labels.shape == positions:
            return labels
        given = self.input
        expected = None if given is None else given[1] if given[0] == "input_ids" else given[1][:-1]
        if given is not None and expected == positions:
            raise ValueError(
                f"{name} has shape {shown} but {given[0]} has shape {checks.shape_str(given[1])}; "
                f"{self.model_name}'s loss takes {name} of shape {checks.shape_str(positions)}, one token id per "
                "position"
            )
        if expected is not None:  # the model kept fewer positions than its input has
            raise ValueError(
                f"{self.model_name} kept {positions.numel()} positions for the loss (logits_to_keep?) but {name} "
                f"has shape {shown}"
            )
        raise ValueError(
            f"{name} has shape {shown} but {self.model_name}'s logits have positions of shape "
            f"{checks.shape_str(positions)}; its loss takes one token id per position"
        )

    def loss_function(
        self,
        logits: Any,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: Any = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """transformers' causal-LM loss, fused: the same shift, ``ignore_index`` and normalisation."""
        positions = logits.shape[:-1]
        if shift_labels is None:
            named, labels = "labels", self.check_labels("labels", labels, positions)
        else:
            named, shift_labels = "shift_labels", self.check_labels("shift_labels", shift_labels, positions)
        if not isinstance(logits, HeadOutput):
            if self.active:
                raise TypeError(f"{self.model_name}.forward passed logits it formed itself to its loss")
            return self.original_loss(
                logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs
            )
        self.consumed += 1
        hidden, head = logits.hidden, logits.head
        if head.weight.shape[0] != vocab_size:
            raise TypeError(
                f"{self.model_name}'s head has {head.weight.shape[0]} outputs but its loss reads {vocab_size} classes"
            )
        if shift_labels is None:
            labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        target = shift_labels.reshape(-1).to(hidden.device)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        checked = value_checks_enabled(target)
        if checked and target.numel():
            bad = ((target < 0) | (target >= vocab_size)) & (target != ignore_index)
            if bool(bad.any()):  # a host sync, as every value check
                raise ValueError(
                    f"{named} hold token id {int(target[bad][0])}, outside [0, {vocab_size}) for "
                    f"{self.model_name}'s vocabulary of {vocab_size} (and not ignore_index={ignore_index})"
                )
        scale, cap = logits.transform()
        if scale != 1.0:
            if head.bias is not None:  # s·(x Wᵀ + b) is not (s·x) Wᵀ + b
                raise logits._refuse("a logit scale to a head with a bias")
            hidden = hidden * scale  # s·(x Wᵀ) = (s·x) Wᵀ
        reduction = "mean" if num_items_in_batch is None else "sum"
        with value_checks(False) if checked else contextlib.nullcontext():  # checked above, naming the labels
            loss: torch.Tensor = self.fused(hidden, head, target, ignore_index, reduction, cap)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss


class _Forward:
    """The patched model's forward: the original one (its signature kept), run fused when :meth:`_Patch.run` says."""

    def __init__(self, state: _Patch, forward: Any) -> None:
        self.state, self.forward = state, forward
        functools.update_wrapper(self, forward)

    def __call__(self, *args: Any, skip_logits: bool | None = None, **kwargs: Any) -> Any:
        return self.state.run(self.forward, args, kwargs, skip_logits)


class _HeadForward:
    """The patched head's forward: its hidden states in a :class:`HeadOutput` during a fused step, else its logits."""

    def __init__(self, state: _Patch, head: nn.Module, forward: Any) -> None:
        self.state, self.head, self.forward = state, head, forward

    def __call__(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.state.active:
            return self.forward(hidden, *args, **kwargs)
        self.state.calls += 1
        # read now, as the head's own forward would: PEFT's active adapter, disable_adapter(), LoRA's dropout
        base, updates = head_parts(self.head, self.state.model_name)
        widened, head = widen(hidden, base, updates)
        return HeadOutput(self.state.model_name, widened, head)

    def __deepcopy__(self, memo: dict[int, Any]) -> _HeadForward:
        # A copy of the whole model (EMA, reference model) copies the patch with it. A copy of the head alone (PEFT's
        # modules_to_save makes one) shares this patch: copying it would copy the whole model it refers to.
        state = copy.deepcopy(self.state, memo) if id(self.state.model) in memo else self.state
        return _HeadForward(state, copy.deepcopy(self.head, memo), copy.deepcopy(self.forward, memo))


def _never_calls_loss_function(forward: Any) -> bool:
    """Whether a model class's forward computes its loss without ``self.loss_function``, read from its source (no
    source: not known here, the first training step tells)."""
    try:
        source = inspect.getsource(inspect.unwrap(forward))
    except (OSError, TypeError):
        return False
    return "loss_function" not in source


class _Absent:
    """What :attr:`_Patch.saved` holds for an attribute the instance did not have (the same object once unpickled)."""

    def __reduce__(self) -> str:
        return "_ABSENT"


_ABSENT = _Absent()


def _bound(forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The forward's arguments by name (``labels`` may be positional)."""
    if not args:
        return kwargs
    return inspect.signature(forward).bind_partial(*args, **kwargs).arguments


def _without_logits(outputs: Any) -> Any:
    """The model's outputs with the head's stand-in replaced by ``None``, the logits that were never formed."""
    if isinstance(outputs, tuple):
        return tuple(None if isinstance(item, HeadOutput) else item for item in outputs)
    for key, value in list(outputs.items()):
        if isinstance(value, HeadOutput):
            outputs[key] = None
    return outputs
