"""What a causal LM's output embeddings compute, read so that xent.hf can fuse them: a plain ``nn.Linear``, or one
wrapped by PEFT (a LoRA adapter on it, or a trainable copy in ``modules_to_save``), as one linear map of (widened)
hidden states. Anything else is refused by its class, naming PEFT's wrapper and the way out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from xent.losses.checks import is_dtensor


class LinearHead(Protocol):
    """What the fused loss reads of a head: logits ``hidden @ weight.T + bias``."""

    @property
    def weight(self) -> torch.Tensor: ...

    @property
    def bias(self) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class WidenedHead:
    """A LoRA head as one linear map of the widened hidden states (see :func:`widen`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class LowRankUpdate:
    """One LoRA adapter of a head: ``scaling · up(down(dropout(x)))``."""

    down: nn.Module  # lora_A: D → r
    up: nn.Linear  # lora_B: r → V
    scaling: float
    dropout: nn.Module


def head_parts(head: nn.Module | None, model_name: str) -> tuple[nn.Linear, list[LowRankUpdate]]:
    """The output embeddings as their logits are computed now: a base ``nn.Linear`` plus the active LoRA updates,
    read through PEFT's wrappers (as their forwards choose); anything else is refused by its class."""
    if head is None:
        raise TypeError(f"{model_name} has no output embeddings; xent.hf fuses an nn.Linear head")
    wrapper_class = peft_class(head)
    wrapper: Any = head  # PEFT's attributes, unannotated
    if wrapper_class == "ModulesToSaveWrapper":
        active = list(wrapper.active_adapters)
        copies = wrapper.modules_to_save
        if wrapper.disable_adapters or not active or any(adapter not in copies for adapter in active):
            return head_parts(wrapper.original_module, model_name)
        return head_parts(copies[active[0]], model_name)
    if wrapper_class == "lora.Linear":
        base, _ = head_parts(wrapper.get_base_layer(), model_name)  # the innermost layer: an nn.Linear or refused
        if wrapper.disable_adapters or wrapper.merged:  # merged: the update is in the base weight
            return base, []
        updates = []
        for adapter in wrapper.active_adapters:
            if adapter not in wrapper.lora_A:
                continue
            variant = getattr(wrapper, "lora_variant", {}).get(adapter)
            if variant is not None or getattr(wrapper, "use_dora", {}).get(adapter):
                kind = "DoRA" if variant is None or "Dora" in type(variant).__name__ else type(variant).__name__
                raise TypeError(
                    f"{model_name}'s output embeddings are PEFT's lora.Linear with a {kind} adapter ({adapter!r}); "
                    "xent.hf fuses plain LoRA on a head (base weight + low-rank update): leave lm_head out of "
                    "target_modules or use plain LoRA on it, or call xent.hf.unpatch(model) to train it unfused"
                )
            updates.append(
                LowRankUpdate(
                    wrapper.lora_A[adapter],
                    wrapper.lora_B[adapter],
                    wrapper.scaling[adapter],
                    wrapper.lora_dropout[adapter],
                )
            )
        return base, updates
    if wrapper_class is not None:
        raise TypeError(
            f"{model_name}'s output embeddings are PEFT's {wrapper_class}; xent.hf fuses an nn.Linear head, a plain "
            "LoRA one (lora.Linear) or one in modules_to_save: change the PEFT config of lm_head, or call "
            "xent.hf.unpatch(model) to train it unfused"
        )
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        shown = f"{type(head).__module__}.{type(head).__qualname__}"
        raise TypeError(f"{model_name} has output embeddings of type {shown}; xent.hf fuses an nn.Linear head")
    return head, []


def widen(hidden: torch.Tensor, base: nn.Linear, updates: list[LowRankUpdate]) -> tuple[torch.Tensor, LinearHead]:
    """LoRA's logits ``x Wᵀ + b + Σ s·B(A(dropout(x)))`` as one linear map: ``[x, s·A(dropout(x)), …]`` times
    ``[W, B, …]ᵀ`` plus ``b + Σ s·b_B``. Exact, dropout included, and the fused loss differentiates x, A and B (and
    W when it trains) through the concatenations; the widened weight is the head's size plus ``V × r``."""
    if not updates:
        return hidden, base
    inputs, weights = [hidden], [base.weight]
    bias: torch.Tensor | None = base.bias
    for update in updates:
        down_dtype = getattr(update.down, "weight", hidden).dtype  # PEFT casts x to lora_A's dtype
        inputs.append((update.down(update.dropout(hidden.to(down_dtype))) * update.scaling).to(hidden.dtype))
        weights.append(update.up.weight.to(base.weight.dtype))
        if update.up.bias is not None:  # lora_bias=True: s·(a Bᵀ + b_B)
            update_bias = update.scaling * update.up.bias
            bias = update_bias if bias is None else bias + update_bias
    return torch.cat(inputs, dim=-1), WidenedHead(torch.cat(weights, dim=1), bias)


def peft_class(module: nn.Module) -> str | None:
    """PEFT's name of a module's class (``lora.Linear``, ``ModulesToSaveWrapper``…), or None outside PEFT."""
    cls = type(module)
    path = cls.__module__.split(".")
    if path[0] != "peft":
        return None
    if len(path) > 2 and path[1] == "tuners":  # peft.tuners.lora.layer.Linear → lora.Linear
        return f"{path[2]}.{cls.__name__}"
    return cls.__name__


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model to patch: a PEFT model's base model, else ``model``."""
    if peft_class(model) is not None and callable(getattr(model, "get_base_model", None)):
        peft_model: Any = model
        base: nn.Module = peft_model.get_base_model()
        return base
    return model


@contextmanager
def logits_layout_off(head: nn.Module) -> Iterator[None]:
    """While a fused step reads a tensor-parallel head (its weight a DTensor, the head not FSDP2's), its forward
    hooks are off: they would lay out logits the head no longer returns. Its pre-hooks, which lay out its input,
    stay."""
    hooks = head._forward_hooks
    if is_dtensor(getattr(head, "weight", None)) and not _is_fsdp_module(head):
        head._forward_hooks = OrderedDict()
    try:
        yield
    finally:
        head._forward_hooks = hooks


def _is_fsdp_module(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages ``module``'s parameters: its hooks are FSDP's, kept."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def refuse_partitioned(weight: torch.Tensor, model_name: str, way_out: str) -> None:
    """DeepSpeed ZeRO-3's parameters (they carry a ``ds_id``) are whole while their module runs and re-gathered when
    read inside the engine's forward (of the module DeepSpeed holds), where xent's fused step reads the head; one
    still partitioned when read (empty: fewer elements than its ``ds_numel``) is refused rather than computed on."""
    whole = getattr(weight, "ds_numel", weight.numel())
    if hasattr(weight, "ds_id") and weight.numel() != whole:
        raise TypeError(
            f"{model_name}'s head is partitioned by DeepSpeed ZeRO-3 and was not gathered when xent read it (it has "
            f"{weight.numel()} of its {whole} elements); xent reads the head inside the model's forward, "
            f"where ZeRO-3 gathers it. {way_out}"
        )
