"""Distillation of Hugging Face causal LMs on xent's fused linear divergences: each model's logits are read as what
its forward computes — the hidden states entering its output embeddings, the head, and the scale and soft cap applied
between the head and the logits it returns — and :func:`xent.linear_distillation_loss` takes them from there, so
neither model's ``N × V`` logits are formed.

How a model's logits are read (:func:`read_logits`), for any ``*ForCausalLM`` of the standard layout::

    model.forward(input_ids, …)      the model's own forward, unchanged (no labels: it returns its logits)
      └ lm_head(hidden)              returns a stand-in holding the hidden states and the head (a LoRA head widened
                                     by its rank, as xent.hf fuses it) instead of the logits
          logits * s, / c, tanh …    recorded by the stand-in (Cohere's and Granite's scales, Gemma 2's soft cap);
                                     anything else raises TypeError naming the model and the operation
      └ outputs.logits               the stand-in: hidden states, head, scale and soft cap → :class:`HeadLogits`

This is xent.hf's machinery (:class:`xent.hf.HeadOutput`, the head's parts as :func:`xent.hf.patch` reads them) run
on a forward without labels: nothing is copied from a model class and no config name is read, so a model type that
scales or caps its logits in a new way is read exactly or refused, never silently wrong. The same reading serves
:func:`distillation_loss` (``xent.hf``) and :func:`xent.trl.patch` (TRL's ``DistillationTrainer``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from xent.integrations.causal_lm_loss import HeadOutput, check_labels
from xent.integrations.heads import causal_lm, head_parts, logits_layout_off, widen
from xent.losses import checks, linear_distillation_loss

__all__ = ["HeadLogits", "distillation_loss", "read_forward", "read_logits"]

# Options of xent.linear_distillation_loss that distillation_loss sets itself, from the models or from the labels.
_FROM_THE_MODELS = (
    "linear_bias",
    "teacher_linear_bias",
    "logit_scale",
    "softcap",
    "teacher_logit_scale",
    "teacher_softcap",
)
_FROM_THE_LABELS = ("target",)
_FULL_TEACHER = ("teacher_indices", "teacher_log_probs", "top_k_tail")


@dataclass(frozen=True)
class HeadLogits:
    """A causal LM's logits as xent's linear losses take them, unformed: ``logit_scale · softcap(hidden Wᵀ + b)``
    (xent's order: the scale after the cap, ``softcap(x) = c · tanh(x / c)``).

    ``hidden`` is ``(B, T, D)`` (``D`` widened by the rank of a LoRA head), ``weight`` ``(V, D)``, ``bias`` ``(V,)``
    or None.
    """

    model_name: str
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None


class _Logits(HeadOutput):
    """xent.hf's stand-in for the logits, with a refusal that speaks of the logits read rather than of a patched
    training loss."""

    def _then(self, step: tuple[Any, ...]) -> _Logits:
        return _Logits(self.model_name, self.hidden, self.head, (*self.steps, step))

    def _refuse(self, operation: str) -> TypeError:
        return TypeError(
            f"{self.model_name} applies {operation} to its logits after its output embeddings; xent reads a model's "
            "logits as its head's hidden states and the scales and tanh soft caps applied after the head, and these "
            "cannot be read without forming them. Compute the loss on its materialised logits (xent.distillation_loss "
            "for distillation), or, in TRL, leave the trainer unpatched (xent.trl.unpatch(trainer))"
        )


def read_logits(model: nn.Module, **forward_kwargs: Any) -> HeadLogits:
    """Run ``model``'s forward on ``forward_kwargs`` (no labels) and return its logits unformed: the hidden states
    entering its output embeddings, the head, and the scale and soft cap it applies after them.

    ``model`` is a transformers causal LM, or a PEFT model of one (its base model runs, as TRL runs it, with the
    adapters in place); it may be patched by :func:`xent.hf.patch` (without labels that patch runs the model as
    unpatched). Gradients flow to the hidden states and the head as the forward's would.

    Raises:
        TypeError: the head is not an ``nn.Linear`` (or a plain LoRA or ``modules_to_save`` one), or the forward does
            something to the logits besides scales and tanh soft caps, does not call its head exactly once, or
            does not return what the head returned as its logits.
    """
    logits, _ = read_forward(model, **forward_kwargs)
    return logits


def read_forward(
    model: nn.Module, *args: Any, call: Callable[..., Any] | None = None, **forward_kwargs: Any
) -> tuple[HeadLogits, Any]:
    """:func:`read_logits` that also returns the forward's outputs (its ``aux_loss``, ``past_key_values``…; their
    ``logits`` is xent's stand-in, not a tensor). ``call`` runs the forward instead of ``model(...)``: the model's
    forward inside a call to the model already under way, whose hooks must not run twice (FSDP2's root would
    reshard its parameters, the head's among them, when the inner call returns)."""
    target = causal_lm(model)
    name = type(target).__name__
    if "labels" in forward_kwargs:
        raise TypeError("read_logits runs the forward without labels: the loss is computed from the logits read")
    found_head = output_embeddings(target)
    head_parts(found_head, name)  # refuses a head it cannot read (None among them), by its class, before anything runs
    head = cast(nn.Module, found_head)
    calls = 0

    def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> _Logits:
        nonlocal calls
        calls += 1
        base, updates = head_parts(head, name)  # read now, as the head's forward would (PEFT's active adapters)
        widened, linear = widen(hidden, base, updates)
        return _Logits(name, widened, linear)

    saved = head.__dict__.get("forward")  # xent.hf's patch of the head, if any: shadowed, then restored
    head.__dict__["forward"] = forward
    try:
        with logits_layout_off(head):
            outputs = (target if call is None else call)(*args, **forward_kwargs)
    finally:
        del head.__dict__["forward"]
        if saved is not None:
            head.__dict__["forward"] = saved
    if calls != 1:
        raise TypeError(f"{name}.forward called its output embeddings {calls} times; xent reads one call to them")
    values = outputs if isinstance(outputs, tuple) else tuple(outputs.values())
    found = [value for value in values if isinstance(value, HeadOutput)]
    if len(found) != 1:
        raise TypeError(f"{name}.forward did not return what its output embeddings computed as its logits")
    logits = found[0]
    scale, cap = logits.transform()  # logits cap · tanh(scale · z / cap): TRL's order, the cap after the scale
    head_logits = HeadLogits(
        model_name=name,
        hidden=logits.hidden,
        weight=logits.head.weight,
        bias=logits.head.bias,
        logit_scale=scale,
        # cap · tanh(s·z / cap) = s · c' · tanh(z / c') with c' = cap / |s| (c'·tanh(z/c') is even in c')
        softcap=None if cap is None else cap / abs(scale),
    )
    return head_logits, outputs


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """A transformers model's output embeddings (its LM head), or a TypeError for a model that is not one."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if not callable(get_output_embeddings):
        raise TypeError(
            f"{type(model).__name__} is not a Hugging Face causal LM (it has no get_output_embeddings); xent's "
            "distillation reads a transformers *ForCausalLM or a PEFT model of one"
        )
    head = get_output_embeddings()
    return head if isinstance(head, nn.Module) else None


def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether the causal LM's forward (a PEFT model's base model's) takes the keyword ``name``."""
    parameters = inspect.signature(causal_lm(model).forward).parameters
    return name in parameters


def check_same_vocabulary(student: HeadLogits, teacher: HeadLogits) -> None:
    """The teacher's head must score the student's vocabulary, on the same device."""
    if student.weight.shape[0] != teacher.weight.shape[0]:
        raise ValueError(
            f"the student ({student.model_name}) has {student.weight.shape[0]} outputs but the teacher "
            f"({teacher.model_name}) has {teacher.weight.shape[0]}; distillation compares distributions over one "
            "vocabulary"
        )
    if student.weight.device != teacher.weight.device:
        raise ValueError(
            f"the student's output embeddings are on {student.weight.device} but the teacher's on "
            f"{teacher.weight.device}; the divergence reads both heads chunk by chunk: place them on one device"
        )


def distillation_loss(
    student_model: nn.Module,
    teacher_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    **loss_options: Any,
) -> torch.Tensor:
    r"""Distil ``teacher_model`` into ``student_model`` on ``input_ids``: the divergence of their next-token
    distributions computed from both models' last hidden states and heads (:func:`xent.linear_distillation_loss`),
    without forming either's ``N × V`` logits.

    The student's forward runs with gradients (as the caller has them), the teacher's under ``torch.no_grad()``; both
    without labels, so each runs as it would to return its logits (a model patched by :func:`xent.hf.patch` too), and
    the scale and soft cap each applies to its logits (Cohere, Granite, Gemma 2) are read from what its forward does,
    not from config names. The teacher may be of another width (and another family) — only the vocabulary must be
    the same — and on its own dtype: each head's products run in its model's dtype.

    Position :math:`t` of the sequence predicts token :math:`t + 1`, as in transformers' causal-LM loss:

    - with ``labels`` (the input's shape, as a causal LM takes them; ``ignore_index`` marks positions to leave out:
      prompt and padding), the kept positions are those whose next label is not ``ignore_index``, and
      ``hard_weight · CE`` of the student's logits on those labels is added (``hard_weight=0`` uses the labels as a
      mask only);
    - without them, every position whose token and next token are both attended to (``attention_mask``; every
      position but the last without one) is kept, and there is no hard-label term.

    The loss is reduced over the kept positions as ``loss_options`` say (by default their mean; with
    ``num_items_in_batch=n`` the sum divided by ``n``, the gradient-accumulation convention of transformers).

    Args:
        student_model: a transformers causal LM (or a PEFT model of one) whose output embeddings are an
            ``nn.Linear`` (a plain LoRA head and ``modules_to_save`` are read as :func:`xent.hf.patch` reads them).
        teacher_model: the same kind of model, over the same vocabulary.
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)``, 1 for tokens, 0 for padding; passed to both forwards.
        labels: ``(B, T)`` token ids, or None.
        **loss_options: options of :func:`xent.linear_distillation_loss`: ``divergence``, ``beta``,
            ``temperature`` (xent's convention: the divergence is multiplied by :math:`T^2`), ``reduction``,
            ``hard_weight``, ``ignore_index``, ``num_items_in_batch``, ``chunk_size``,
            ``impl``. What the models and labels decide (the heads' biases, scales and soft caps, ``target``) and
            the top-k teacher's options are refused.

    Returns:
        The loss, as :func:`xent.linear_distillation_loss` returns it.

    Raises:
        TypeError: a model whose logits cannot be read (see ``xent.integrations.distill``), an option the models
            decide, or labels that are not token ids.
        ValueError: the models' vocabularies or heads' devices differ, or ``attention_mask``/``labels`` do not have
            the input's shape.

    Example:
        >>> import transformers
        >>> import xent.hf
        >>> def llama(width):
        ...     return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...         vocab_size=100, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        ...         num_attention_heads=4))
        >>> student, teacher = llama(16), llama(32)
        >>> input_ids = torch.randint(100, (2, 12))
        >>> loss = xent.hf.distillation_loss(student, teacher, input_ids, divergence="jsd", temperature=2.0)
        >>> loss.backward()                                  # the student's gradients; no (24 × 100) logits
    """
    for name in loss_options:
        if name in _FROM_THE_MODELS:
            raise TypeError(f"{name} is read from the models' forwards, not given to distillation_loss")
        if name in _FROM_THE_LABELS:
            raise TypeError("target is the labels shifted by one: pass labels=")
        if name in _FULL_TEACHER:
            raise TypeError(f"{name} is an option of a top-k teacher; distillation_loss reads the teacher's full head")
    input_ids = checks.check_tensor("input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T) token ids, got shape {checks.shape_str(input_ids.shape)}")
    if attention_mask is not None and checks.check_tensor("attention_mask", attention_mask).shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {checks.shape_str(attention_mask.shape)} but input_ids has shape "
            f"{checks.shape_str(input_ids.shape)}; they must be equal"
        )
    ignore_index = loss_options.pop("ignore_index", -100)
    if labels is None:
        if "hard_weight" in loss_options:
            raise ValueError("hard_weight weighs the hard-label term, which needs labels; pass labels=")
        kept = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
        if attention_mask is not None:
            kept = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
        target = torch.zeros_like(input_ids[:, 1:]).masked_fill(~kept, ignore_index)
        loss_options["hard_weight"] = 0.0  # the target only masks
    else:
        student_name = type(causal_lm(student_model)).__name__
        labels = check_labels(
            "labels", labels, input_ids.shape, model_name=student_name, given=("input_ids", input_ids.shape)
        )
        target = labels[:, 1:]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    student = read_logits(student_model, **inputs)
    with torch.no_grad():
        teacher = read_logits(teacher_model, **inputs)
    check_same_vocabulary(student, teacher)
    device = student.weight.device  # with a device_map the backbone may end on another device than the head
    return linear_distillation_loss(
        student.hidden[:, :-1].to(device),
        student.weight,
        teacher.hidden[:, :-1].to(device),
        teacher.weight.detach(),  # its parameters may require grad: the teacher is not trained
        linear_bias=student.bias,
        teacher_linear_bias=None if teacher.bias is None else teacher.bias.detach(),
        logit_scale=student.logit_scale,
        softcap=student.softcap,
        teacher_logit_scale=teacher.logit_scale,
        teacher_softcap=teacher.softcap,
        target=target.to(device),
        ignore_index=ignore_index,
        **loss_options,
    )
