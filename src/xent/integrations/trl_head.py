"""TRL's fused-LM-head protocol served by xent: the forward ``model(..., labels=labels, fused_lm_head=True)`` that
TRL 1.16's GRPO, RLOO, DPO, KTO and SFT trainers call, computed by :func:`xent.linear_token_outputs`.

TRL's ``add_fused_lm_head`` sets each model's ``forward`` (an instance attribute) to a function that, called with
``fused_lm_head=True``, runs the backbone and TRL's ``ChunkedLogProbFunction`` and returns a ``FusedCausalLMOutput``.
:func:`install` sets it to xent's, which returns the same fields from the same call::

    model(*args, labels=…, fused_lm_head=True, shift_labels=…, num_items_in_batch=…, **kwargs)
      └ the model's own forward          run without labels, its head returning its hidden states (xent.hf's
                                         reading): the scale and soft cap it applies to its logits read from what
                                         it does, not from config names; a LoRA head widened as xent.hf fuses it
      └ labels[:, 1:] (or shift_labels)  only the positions whose label is not -100 go through the head
      └ linear_token_outputs             log_probs, entropy, log Σ p², mean logit, top-1 — the fields TRL's
                                         trainer asked for (its own add_fused_lm_head call, read from TRL's forward),
                                         at its temperature, in float32 outside autocast when it cast the head
      └ FusedCausalLMOutput              each field zero where the label is -100, the loss −Σ log p / count (or
                                         num_items_in_batch) plus the MoE router loss the forward returned

Called without ``fused_lm_head``, the forward is TRL's (so the model's own), and generation is unchanged.

Where TRL reads a hand-kept list of config names (``logit_scale``, ``logits_scaling``, ``final_logit_softcapping``…),
xent reads what the forward does (a model that does something else to its logits is refused by name, never silently
wrong). Where TRL gathers a tensor-parallel head whole (``DTensor.full_tensor``: every rank then holds the whole
``V × D`` head and its gradient), xent runs :func:`xent.distributed.vocab_parallel_linear_token_outputs` on each
rank's rows of the vocabulary: a head whose weight is a ``DTensor`` sharded on the vocabulary over a 1-D mesh
(``ColwiseParallel``), its input laid out by the head's own input hook, its output hook skipped (there are no logits
to lay out).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xent.distributed.logprobs import vocab_parallel_linear_token_outputs
from xent.integrations.distill import HeadLogits, read_forward
from xent.integrations.heads import refuse_partitioned
from xent.losses import linear_token_outputs
from xent.losses.checks import is_dtensor

_TRL_SETTINGS = ("temperature", "cast_lm_head_to_fp32", "outputs")


@dataclass(frozen=True)
class HeadSettings:
    """What TRL's trainer asked of a model's fused head (its ``add_fused_lm_head`` call)."""

    temperature: float
    cast_lm_head_to_fp32: bool
    outputs: tuple[str, ...]


def trl_forward(model: nn.Module) -> types.MethodType | None:
    """The fused forward TRL's ``add_fused_lm_head`` set on ``model``, or None. Recognised by its code, one of
    ``add_fused_lm_head``'s constants (its names are the model's: TRL wraps it in the model's forward's)."""
    forward = model.__dict__.get("forward")
    if not isinstance(forward, types.MethodType):
        return None
    add_fused_lm_head = importlib.import_module("trl.trainer.utils").add_fused_lm_head
    code = getattr(forward.__func__, "__code__", None)
    return forward if code is not None and code in add_fused_lm_head.__code__.co_consts else None


def settings_of(forward: types.MethodType) -> HeadSettings:
    """The temperature, fp32 cast and outputs TRL's forward was built with (the arguments of the trainer's
    ``add_fused_lm_head`` call, held by the forward's closure)."""
    nonlocals = inspect.getclosurevars(forward.__func__).nonlocals
    missing = [name for name in _TRL_SETTINGS if name not in nonlocals]
    if missing:  # pragma: no cover - another TRL than the one patch() checks for
        raise TypeError(f"TRL's fused forward does not hold {', '.join(missing)}; xent.trl serves TRL 1.16's")
    return HeadSettings(
        float(nonlocals["temperature"]), bool(nonlocals["cast_lm_head_to_fp32"]), tuple(nonlocals["outputs"])
    )


def install(model: nn.Module, chunk_size: int | None) -> types.MethodType:
    """Replace TRL's fused forward on ``model`` by xent's; returns TRL's, for :func:`restore`."""
    original = trl_forward(model)
    if original is None:
        raise TypeError(
            f"{type(model).__name__} has no fused LM head of TRL's (add_fused_lm_head): TRL's trainers add it when "
            "they are built; patch the trainer after building it"
        )
    head = _FusedHead(model, original, settings_of(original), chunk_size)

    @functools.wraps(type(model).forward)  # the model's signature: generate validates its kwargs against it
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return head(*args, **kwargs)

    model.__dict__["forward"] = types.MethodType(forward, model)
    return original


def restore(model: nn.Module, original: types.MethodType) -> None:
    """Give ``model`` TRL's fused forward back."""
    model.__dict__["forward"] = original


class _FusedHead:
    """A model's forward under TRL's protocol: TRL's own without ``fused_lm_head``, xent's fused head with it."""

    def __init__(
        self, model: nn.Module, original: Callable[..., Any], settings: HeadSettings, chunk_size: int | None
    ) -> None:
        self.model, self.original, self.settings, self.chunk_size = model, original, settings, chunk_size
        config: Any = model.config
        self.text_config = config.get_text_config() if hasattr(config, "get_text_config") else config

    def __call__(
        self,
        *args: Any,
        fused_lm_head: bool = False,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head:
            return self.original(
                *args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        if labels is None and shift_labels is None:
            raise ValueError("a fused LM head forward (fused_lm_head=True) needs labels or shift_labels")
        kwargs["use_cache"] = False
        if getattr(self.text_config, "output_router_logits", False):  # MoE: as the model's own forward asks
            kwargs.setdefault("output_router_logits", True)
        # TRL's forward, so the model's own: the call to the model under way already ran its hooks (FSDP2's root)
        logits, outputs = read_forward(self.model, *args, call=self.original, **kwargs)
        if shift_labels is None:
            hidden, targets = logits.hidden[:, :-1], labels[:, 1:]  # type: ignore[index]
        else:
            hidden, targets = logits.hidden, shift_labels
        weight, bias = logits.weight, logits.bias
        _refuse_unreadable(weight, logits)
        sharded = is_dtensor(weight)  # a tensor-parallel head: its rank's rows of the vocabulary
        device = weight.to_local().device if is_dtensor(weight) else weight.device
        if is_dtensor(hidden):  # laid out by the head's input hook: whole on every rank of the head's group
            hidden = hidden.full_tensor()
        hidden, targets = hidden.to(device), targets.to(device)  # a device_map may split the model
        mask = targets != -100
        autocast: AbstractContextManager[Any] = nullcontext()
        if self.settings.cast_lm_head_to_fp32:  # TRL's option: the head's product in float32, outside autocast
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
            autocast = torch.autocast(hidden.device.type, enabled=False)
        options: dict[str, Any] = {
            "temperature": self.settings.temperature,
            "logit_scale": logits.logit_scale,
            "softcap": logits.softcap,
            "chunk_size": self.chunk_size,
            "outputs": self.settings.outputs,
        }
        with autocast:
            if sharded:
                kept = vocab_parallel_linear_token_outputs(
                    hidden[mask], weight, targets[mask], linear_bias_shard=bias, **options
                )
            else:
                kept = linear_token_outputs(hidden[mask], weight, targets[mask], linear_bias=bias, **options)
        # masked_scatter keeps every output connected to the model even when no label counts: a differentiable zero
        fields = {
            name: None if value is None else value.new_zeros(mask.shape).masked_scatter(mask, value)
            for name, value in kept._asdict().items()
        }
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -kept.log_probs.sum() / count
        aux_loss = _aux_loss(outputs, kwargs, logits)
        if aux_loss is not None:
            loss = loss + getattr(self.text_config, "router_aux_loss_coef", 0.0) * aux_loss
        output_class = importlib.import_module("trl.trainer.utils").FusedCausalLMOutput
        return output_class(loss=loss, **fields, label_mask=mask, aux_loss=aux_loss)


def _aux_loss(outputs: Any, kwargs: dict[str, Any], logits: HeadLogits) -> torch.Tensor | None:
    """The MoE load-balancing loss the forward returned when router logits were asked for (None otherwise)."""
    if not kwargs.get("output_router_logits"):
        return None
    aux_loss: torch.Tensor | None = getattr(outputs, "aux_loss", None)
    if aux_loss is None:
        raise TypeError(
            f"{logits.model_name} was asked for its router logits (output_router_logits=True) but returned no "
            "aux_loss; xent.trl takes the MoE load-balancing loss from the model's own forward"
        )
    return aux_loss


def _refuse_unreadable(weight: torch.Tensor, logits: HeadLogits) -> None:
    """Heads whose weight is not whole when the head has been called: DeepSpeed ZeRO-3's partitions, an FSDP2 unit
    of its own resharded after its call, an FSDP2 shard read outside its unit's forward. A tensor-parallel head's
    weight is a DTensor sharded on the vocabulary and its input a DTensor laid out by the head's input hook."""
    where = f"{logits.model_name}'s head"
    refuse_partitioned(
        weight, logits.model_name, "Leave the trainer unpatched (xent.trl.unpatch(trainer)) under ZeRO-3"
    )
    if is_dtensor(weight) and not is_dtensor(logits.hidden):
        raise TypeError(
            f"{where} weight is a DTensor ({weight.placements}) but its input is not one: an FSDP2 shard rather than "
            "a tensor-parallel head; shard the head with its parent module (fully_shard the model's root), not as "
            "a unit of its own"
        )
    if not is_dtensor(weight) and weight.numel() and weight.untyped_storage().size() == 0:
        raise TypeError(
            f"{where} weight was freed after the head's call (FSDP2 resharded a unit of its own); shard the head "
            "with its parent module (fully_shard the model's root), or set reshard_after_forward=False on its unit"
        )
