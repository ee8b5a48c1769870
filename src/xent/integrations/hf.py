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

This module holds the patch itself — the checks at patch time, what it installs on the instance and how a call is
routed; what a fused step computes (the head's stand-in for the logits, the loss) is in
:mod:`xent.integrations.causal_lm_loss`.
"""

from __future__ import annotations

import copy
import functools
import inspect
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

from xent.integrations.causal_lm_loss import FusedLoss, HeadOutput, check_labels
from xent.integrations.heads import causal_lm, head_parts, logits_layout_off, widen

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
            with logits_layout_off(self.head):
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
            labels = check_labels("labels", labels, positions, model_name=self.model_name, given=self.input)
        else:
            shift_labels = check_labels(
                "shift_labels", shift_labels, positions, model_name=self.model_name, given=self.input
            )
        if not isinstance(logits, HeadOutput):
            if self.active:
                raise TypeError(f"{self.model_name}.forward passed logits it formed itself to its loss")
            return self.original_loss(
                logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs
            )
        self.consumed += 1
        return self.fused.causal_lm_loss(logits, labels, shift_labels, vocab_size, num_items_in_batch, ignore_index)


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
