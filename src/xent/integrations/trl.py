"""TRL 1.16's trainers on xent's kernels: :func:`patch` one trainer, :func:`unpatch` it.

Two kinds of trainer, one entry point:

- ``GRPOTrainer``, ``RLOOTrainer``, ``DPOTrainer``, ``KTOTrainer`` and ``SFTTrainer`` compute every loss from the
  per-token outputs of TRL's fused LM head (``model(..., labels=…, fused_lm_head=True)``, set on the model and the
  reference model by TRL's ``add_fused_lm_head``). The patch gives both models xent's fused head for that call
  (:mod:`xent.integrations.trl_head`): every TRL option keeps working, because the trainer's code is TRL's own.
- ``DistillationTrainer``'s loss step becomes :func:`xent.linear_distillation` of the student's and teacher's
  heads (:mod:`xent.integrations.trl_distill`).
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Any

from torch import nn

from xent.integrations import trl_head
from xent.integrations.distill import output_embeddings
from xent.integrations.heads import causal_lm, head_parts
from xent.integrations.trl_distill import ComputeLoss, Options, divergence_from_beta
from xent.kernels.dispatch import Impl, check_impl
from xent.losses import checks

__all__ = ["divergence_from_beta", "is_patched", "patch", "unpatch"]

_STATE = "_xent_trl_patch"
_TRL_VERSION = "1.16"  # the trainers and the fused-head protocol this module stands in for
# The trainers whose models TRL gives a fused LM head: (module, class).
_FUSED_HEAD_TRAINERS = (
    ("trl.trainer.grpo_trainer", "GRPOTrainer"),
    ("trl.trainer.rloo_trainer", "RLOOTrainer"),
    ("trl.trainer.dpo_trainer", "DPOTrainer"),
    ("trl.trainer.kto_trainer", "KTOTrainer"),
    ("trl.trainer.sft_trainer", "SFTTrainer"),
)
_NAMES = ", ".join(name for _, name in _FUSED_HEAD_TRAINERS) + " or DistillationTrainer"


def patch(trainer: Any, *, chunk_size: int | None = None, impl: Impl | None = None) -> Any:
    r"""Run a TRL 1.16 trainer's language-model head on xent's kernels.

    Patches ``trainer`` in place (this instance only) and returns it.

    **GRPO, RLOO, DPO, KTO, SFT.** TRL builds these trainers with its own fused LM head on the model (its base model
    under PEFT) and on the reference model: called with ``fused_lm_head=True`` the model returns a
    ``FusedCausalLMOutput`` of per-token log-probabilities and whatever else the trainer asked for (entropy,
    :math:`\log \sum p^2`, mean logit, top-1), never the logits. The patch answers the same call with
    :func:`xent.linear_token_outputs`: the same fields (each zero where the label is -100), the same loss and MoE
    router loss, at the trainer's temperature and fp32 cast, so the trainer's loss, its metrics and every
    parameter's gradient are TRL's own (to float32 rounding), whatever the loss type or option. Each model's logit
    scale and soft cap are read from what its forward does (as :func:`xent.hf.patch` reads them), not from config
    names; a LoRA head is fused as :func:`xent.hf.patch` fuses it; only the positions with a label go through the
    head. Under FSDP2 the head is read as the model's forward unshards it (with its parent module or the root); a
    tensor-parallel head (its weight a ``DTensor`` sharded on the vocabulary) runs vocab-parallel
    (:func:`xent.distributed.vocab_parallel_linear_token_outputs`), each rank its rows, where TRL gathers it whole.

    **Distillation.** A ``DistillationTrainer``'s ``_compute_loss`` becomes :func:`xent.linear_distillation_loss`
    of the student's and the teacher's heads:

    - the divergence is TRL's ``beta`` read at each step (:func:`divergence_from_beta`), at
      ``trainer.temperature``, divided by :math:`T^2` (TRL's divergence has no :math:`T^2` factor, xent's does);
    - the tokens are the completion's (times ``tool_mask`` when the batch has one), reduced as TRL: the sum
      divided by ``num_items_in_batch`` when TRL passes one (training), else the mean over the kept tokens;
    - the teacher may be of another width and dtype, same vocabulary.

    Args:
        trainer: a ``GRPOTrainer``, ``RLOOTrainer``, ``DPOTrainer``, ``KTOTrainer``, ``SFTTrainer`` or
            ``DistillationTrainer`` of TRL 1.16 (or a subclass), after it is built.
        chunk_size: tokens per chunk of the head's logits (by default xent's choice).
        impl: distillation only: :func:`xent.linear_distillation_loss`'s implementation.

    Returns:
        ``trainer``, patched.

    Raises:
        ImportError: TRL is not installed (``pip install "xent[trl]"``).
        TypeError: ``trainer`` is none of these trainers of TRL 1.16; a model has no fused head of TRL's (the
            trainer is not built yet); a ``DistillationTrainer`` subclass replaces the loss steps the patch stands
            in for (``_compute_loss``, ``_get_last_hidden_state``); a model's head cannot be read (its class is
            named).
        ValueError: the trainer is already patched; ``impl`` given for a trainer other than distillation's; a
            ``DistillationTrainer`` has no local teacher (a teacher served elsewhere gives no head to fuse).

    When a step runs, a model whose forward does something to its logits besides scales and tanh soft caps, a head
    partitioned by DeepSpeed ZeRO-3 or one FSDP2 shards as a unit of its own is refused with a TypeError naming it;
    :func:`unpatch` gives the trainer back TRL's own head.

    Example (not run here: it needs TRL)::

        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=prompts)
        xent.trl.patch(trainer)
        trainer.train()
    """
    _import_trl()
    if is_patched(trainer):
        raise ValueError(
            f"this {type(trainer).__name__} is already patched by xent.trl; call xent.trl.unpatch(trainer) first"
        )
    chunk_size = checks.check_chunk_size(chunk_size)
    distillation_trainer = importlib.import_module("trl.trainer.distillation_trainer").DistillationTrainer
    if isinstance(trainer, distillation_trainer):
        return _patch_distillation(trainer, distillation_trainer, Options(chunk_size, check_impl(impl)))
    if not any(isinstance(trainer, cls) for cls in _fused_head_trainer_classes()):
        raise TypeError(f"xent.trl.patch takes a TRL {_NAMES}, got {type(trainer).__name__}")
    if impl is not None:
        raise ValueError(
            f"impl={impl!r} selects the distillation kernel; a {type(trainer).__name__}'s head runs on "
            "xent.linear_token_outputs, which has one implementation"
        )
    models = _head_models(trainer)
    for model in models:
        head_parts(output_embeddings(model), type(model).__name__)  # a head it cannot read is refused now
        if trl_head.trl_forward(model) is None:
            raise TypeError(
                f"the {type(model).__name__} of this {type(trainer).__name__} has no fused LM head of TRL's "
                "(add_fused_lm_head): patch the trainer after it is built"
            )
    trainer.__dict__[_STATE] = _FusedHeads([(model, trl_head.install(model, chunk_size)) for model in models])
    return trainer


def unpatch(trainer: Any) -> Any:
    """Undo :func:`patch`: the trainer runs on TRL's own head (or loss) again (returns ``trainer``)."""
    if not is_patched(trainer):
        raise ValueError(f"this {type(trainer).__name__} is not patched by xent.trl")
    state = trainer.__dict__.pop(_STATE)
    if isinstance(state, _FusedHeads):
        for model, original in state.models:
            trl_head.restore(model, original)
    else:
        del trainer.__dict__["_compute_loss"]
    return trainer


def is_patched(trainer: Any) -> bool:
    """Whether :func:`patch` has patched this trainer."""
    return _STATE in getattr(trainer, "__dict__", {})


@dataclass(frozen=True)
class _FusedHeads:
    """A patched fused-head trainer: each model given xent's head, with TRL's forward to give back."""

    models: list[tuple[nn.Module, types.MethodType]]


def _import_trl() -> None:
    try:  # imported here: xent.trl imports without TRL (the documentation's autodoc, Sybil's docstrings)
        trl = importlib.import_module("trl")
    except ImportError as error:  # pragma: no cover - exercised without the extra only
        raise ImportError('xent.trl needs TRL: pip install "xent[trl]"') from error
    if not str(trl.__version__).startswith(f"{_TRL_VERSION}."):
        raise TypeError(
            f"xent.trl.patch stands in for TRL {_TRL_VERSION}'s trainers; TRL {trl.__version__} is installed "
            f'(pip install "xent[trl]" installs {_TRL_VERSION})'
        )


def _fused_head_trainer_classes() -> list[type]:
    return [getattr(importlib.import_module(module), name) for module, name in _FUSED_HEAD_TRAINERS]


def _head_models(trainer: Any) -> list[nn.Module]:
    """The models TRL gave a fused head: the trained model (a PEFT model's base model) and the reference model."""
    models = [causal_lm(trainer.accelerator.unwrap_model(trainer.model))]
    reference = getattr(trainer, "ref_model", None)
    if reference is not None:
        reference = causal_lm(trainer.accelerator.unwrap_model(reference))
        if all(reference is not model for model in models):
            models.append(reference)
    return models


def _patch_distillation(trainer: Any, distillation_trainer: type, options: Options) -> Any:
    name = type(trainer).__name__
    for method in ("_compute_loss", "_get_last_hidden_state"):
        if getattr(type(trainer), method) is not getattr(distillation_trainer, method):
            raise TypeError(
                f"{name} replaces DistillationTrainer.{method}, which xent.trl.patch stands in for; it serves "
                "DistillationTrainer's own loss"
            )
    if trainer.teacher_model is None:
        raise ValueError(
            f"this {name} has no local teacher model (teacher_model=None, a teacher served elsewhere): xent.trl fuses "
            "the teacher's head with the student's"
        )
    for role, model in (("student", trainer.model), ("teacher", trainer.teacher_model)):
        target = causal_lm(trainer.accelerator.unwrap_model(model))
        head_parts(output_embeddings(target), f"the {role} {type(target).__name__}")
    trainer.__dict__["_compute_loss"] = ComputeLoss(trainer, options)
    trainer.__dict__[_STATE] = options
    return trainer
