"""TRL's ``DistillationTrainer`` (TRL 1.16) on xent's fused divergences: its loss step is
:func:`xent.linear_distillation` of both models' hidden states and heads (the loss, and the entropy TRL logs).

What a patched trainer's step runs, in place of TRL's ``DistillationTrainer._compute_loss`` (everything around it —
generation, ``compute_loss``'s ``num_items_in_batch`` and entropy logging, the forward redirection through DDP/FSDP
wrappers — stays TRL's)::

    prompt_ids + completion_ids     the sequence, masks concatenated as TRL does
      └ student forward             the model's own forward, its head returning its hidden states (xent.hf's
                                    reading): the scale and soft cap it applies to its logits are read from what it
                                    does, not from config names; logits_to_keep as TRL passes it
      └ teacher forward             the same, under no_grad, through the trainer's forward redirection; another width
      └ linear_distillation         divergence from trainer.beta (0 forward KL, 1 reverse KL, else JSD with β),
                                    temperature=trainer.temperature, the completion (and tool) mask as the target's
                                    ignore_index, the mean over kept tokens or sum / num_items_in_batch; / T² (TRL's
                                    divergence has no T² factor, xent's has), and the student's entropy for TRL's
                                    metric

TRL's kernel reads the scale and cap from config names (``logit_scale``, ``logits_scaling``,
``final_logit_softcapping``…) in the order ``cap(s · x)``; xent reads the steps the forward applies after the head, in
the same order, and hands them to its loss as ``logit_scale = s``, ``softcap = c / s``. For the models whose config
names TRL knows the two agree; for others xent's is what the model computes (or a refusal naming the operation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xent.integrations.distill import (
    HeadLogits,
    check_same_vocabulary,
    forward_accepts,
    read_logits,
)
from xent.kernels.dispatch import Impl
from xent.losses import checks, linear_distillation

# Multimodal (VLM) fields of a batch, passed to both forwards as TRL passes them to the backbones.
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def divergence_from_beta(beta: float) -> tuple[str, float | None]:
    r"""TRL's ``beta`` (``DistillationConfig.beta``, GKD's) as xent's ``(divergence, beta)``.

    TRL's generalized JSD :math:`\beta\,\mathrm{KL}(q \| m) + (1 - \beta)\,\mathrm{KL}(p \| m)`,
    :math:`m = \beta q + (1 - \beta) p` (teacher :math:`q`, student :math:`p`), is xent's ``"jsd"`` with the same
    :math:`\beta` for :math:`0 < \beta < 1`; TRL reads its endpoints as the KL divergences: :math:`\beta = 0` is the
    forward KL :math:`\mathrm{KL}(q \| p)`, :math:`\beta = 1` the reverse KL :math:`\mathrm{KL}(p \| q)`.

    Returns:
        ``("forward_kl", None)``, ``("reverse_kl", None)`` or ``("jsd", beta)``: the keyword arguments
        ``divergence`` and ``beta`` of :func:`xent.distillation_loss` and :func:`xent.linear_distillation_loss`.

    Raises:
        ValueError: ``beta`` outside :math:`[0, 1]`.

    Example:
        >>> import xent.trl
        >>> xent.trl.divergence_from_beta(0.0), xent.trl.divergence_from_beta(0.5)
        (('forward_kl', None), ('jsd', 0.5))
    """
    value = checks.check_number("beta", beta)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"TRL's beta must be in [0, 1] (0 forward KL, 1 reverse KL, JSD between), got {beta!r}")
    if value == 0.0:
        return "forward_kl", None
    if value == 1.0:
        return "reverse_kl", None
    return "jsd", value


@dataclass(frozen=True)
class Options:
    chunk_size: int | None
    impl: Impl | None


class ComputeLoss:
    """The patched trainer's ``_compute_loss(unwrapped_student, inputs, num_items_in_batch)``: TRL 1.16's, with the
    divergence on xent's fused kernels. Returns ``(loss, entropy_sum, num_valid_tokens)`` as TRL's does."""

    def __init__(self, trainer: Any, options: Options) -> None:
        self.trainer, self.options = trainer, options

    def __call__(
        self, unwrapped_student: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        trainer = self.trainer
        divergence, beta = divergence_from_beta(trainer.beta)  # read at each step, as TRL reads it
        temperature = float(trainer.temperature)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # multi-turn: the tools' tokens are not the student's
            loss_mask = loss_mask * inputs["tool_mask"]
        completion_length = inputs["completion_ids"].size(1)
        multimodal = {key: inputs[key] for key in _MULTIMODAL_KEYS if key in inputs}

        student = _completion_logits(unwrapped_student, input_ids, attention_mask, completion_length, multimodal)
        trainer.teacher_model.eval()
        unwrapped_teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
        with torch.no_grad():
            # through the teacher's wrapper, as TRL runs it: FSDP/DeepSpeed gather its parameters for the forward
            teacher = trainer._forward_redirection(
                trainer.teacher_model,
                unwrapped_teacher,
                _completion_logits,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                completion_length,
                multimodal,
            )
        check_same_vocabulary(student, teacher)
        for role, logits in (("student", student), ("teacher", teacher)):
            _refuse_sharded(role, logits)
        device = student.weight.device  # with a device_map the backbone may end on another device than the head
        valid = loss_mask.to(device) != 0
        ignore_index = -100
        target = torch.zeros(valid.shape, dtype=torch.long, device=device).masked_fill(~valid, ignore_index)
        loss, entropy = linear_distillation(
            student.hidden.to(device),
            student.weight,
            teacher.hidden.to(device),
            teacher.weight.detach(),  # its parameters may require grad: the teacher is not trained
            linear_bias=student.bias,
            teacher_linear_bias=None if teacher.bias is None else teacher.bias.detach(),
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            reduction="mean",  # the mean over kept tokens (0 when none), or with num_items_in_batch sum / it
            logit_scale=student.logit_scale,
            softcap=student.softcap,
            teacher_logit_scale=teacher.logit_scale,
            teacher_softcap=teacher.softcap,
            target=target,
            hard_weight=0.0,  # the target only masks: TRL's loss has no hard-label term
            ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.options.chunk_size,
            impl=self.options.impl,
        )
        # TRL's divergence has no T² factor (its generalized_jsd_loss and kernel), xent's (Hinton's) has; TRL's loss
        # is float32 whatever the models' dtype.
        loss = loss.float() / (temperature * temperature)
        entropy_sum = entropy.detach().float().masked_fill(~valid, 0.0).sum()
        return loss, entropy_sum, valid.sum()


def _completion_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    multimodal: dict[str, Any],
) -> HeadLogits:
    """The model's logits at the positions that predict the completion's tokens, unformed (TRL's
    ``_get_last_hidden_state``, through the whole forward so that what follows the head is read too)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **multimodal, "use_cache": False}
    if forward_accepts(model, "logits_to_keep"):
        inputs["logits_to_keep"] = completion_length + 1  # + 1: the last position predicts past the sequence
    logits = read_logits(model, **inputs)
    hidden = logits.hidden[:, :-1, :][:, -completion_length:, :]  # (B, K, D)
    return HeadLogits(logits.model_name, hidden, logits.weight, logits.bias, logits.logit_scale, logits.softcap)


def _refuse_sharded(role: str, logits: HeadLogits) -> None:
    """Heads whose parameters are shards (FSDP2's DTensor, DeepSpeed ZeRO-3's partitions) are not read here."""
    sharded: tuple[type, ...] = ()
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        sharded = (DTensor,)
    for name, tensor in (("weight", logits.weight), ("bias", logits.bias)):
        if tensor is None:
            continue
        if isinstance(tensor, sharded):
            raise TypeError(
                f"the {role}'s ({logits.model_name}) head {name} is an FSDP2-sharded DTensor; xent.trl reads whole "
                "heads: leave the trainer unpatched (xent.trl.unpatch(trainer)) under FSDP2"
            )
        if hasattr(tensor, "ds_id"):
            raise TypeError(
                f"the {role}'s ({logits.model_name}) head {name} is partitioned by DeepSpeed ZeRO-3; xent.trl reads "
                "whole heads: leave the trainer unpatched (xent.trl.unpatch(trainer)) under ZeRO-3"
            )
