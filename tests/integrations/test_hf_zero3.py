"""xent.hf under DeepSpeed ZeRO-3, through ``transformers.Trainer``, on 2 real processes (gloo, DeepSpeed's CPU
accelerator): ZeRO-3 partitions every parameter and gathers one read inside the engine's forward, where xent's fused
step reads the head, so the patched model fuses every micro-batch on the whole head and trains with the unpatched
model's losses and final weights — the head untied (the model built under ``deepspeed.zero.Init``, as
``from_pretrained`` builds it) and tied (built whole, partitioned by the engine). A head still partitioned when xent
reads it (the model inside the module DeepSpeed holds, called on its own: outside the engine's forward) is refused
by name."""

from __future__ import annotations

import traceback

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

import xent.hf
from tests.distributed.spawn import run_ranks
from tests.integrations.tiny_models import tiny_model
from tests.integrations.trainer_engines import (
    HEAD_NUMEL,
    STEPS,
    WORLD,
    TokenData,
    arguments,
    assert_patched_trains_as_unpatched,
    free_port,
    rank_environment,
)

ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,  # every parameter partitioned, the smallest included
        "stage3_prefetch_bucket_size": 0,
        "reduce_bucket_size": 1000,
        "offload_optimizer": {"device": "none"},
        "offload_param": {"device": "none"},
    },
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
    # no "optimizer": the Trainer's (torch's AdamW), which ZeRO-3 wraps; DeepSpeed's own AdamW is a C++ extension
    # compiled on first use (about 40 s here)
    "zero_allow_untested_optimizer": True,
}


def _train(tied, patched, output_dir):
    """The per-step losses and every final weight (gathered) of one ZeRO-3 run from scratch."""
    import deepspeed
    import transformers

    args = arguments(output_dir, deepspeed=ZERO3)  # ZeRO-3 on from here (transformers holds the config meanwhile)
    if tied:  # built whole (ZeRO-3 is not consulted by the constructor), partitioned when the engine is made
        model = tiny_model("llama", seed=0, tie_word_embeddings=True)
        assert not hasattr(model.lm_head.weight, "ds_id")
    else:  # built under deepspeed.zero.Init (transformers does when ZeRO-3 is enabled), partitioned at once
        config = tiny_model("llama", tie_word_embeddings=False).config
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.float32)
        assert model.lm_head.weight.numel() == 0 and hasattr(model.lm_head.weight, "ds_id")
    if patched:
        xent.hf.patch(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS
    assert hasattr(model.lm_head.weight, "ds_id")
    assert model.lm_head.weight.numel() == 0  # partitioned again after the step
    parameters = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(parameters.values()), modifier_rank=None):
        weights = {name: parameter.detach().clone() for name, parameter in parameters.items()}
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return losses, weights


class _Holder(torch.nn.Module):
    """A module holding the model, given to DeepSpeed in its place (as a wrapper holding a policy is)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch)


def _refused_outside_the_engine():
    """A head still partitioned when xent reads it is refused by name. DeepSpeed gathers a parameter read outside its
    module's call only inside the engine's forward (its hook on the module it holds marks every submodule), so the
    model is given to DeepSpeed inside a holder and called on its own: each module's parameters are gathered for its
    own call only, and the head is partitioned again when xent reads it after. (Called through the engine, xent's
    read registers the head's weight with the model, which gathers it from then on for its whole forward.)"""
    import deepspeed

    model = tiny_model("llama", seed=0, tie_word_embeddings=False)
    xent.hf.patch(model)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": ZERO3["zero_optimization"]}
    deepspeed.initialize(model=_Holder(model), config=config)
    assert model.lm_head.weight.numel() == 0
    batch = TokenData()[0]
    with pytest.raises(
        TypeError, match=rf"partitioned by DeepSpeed ZeRO-3 and was not gathered .* 0 of its {HEAD_NUMEL}"
    ):
        model(input_ids=batch["input_ids"][None], labels=batch["labels"][None])


def _worker(rank, world, port, output_dir, failures):
    rank_environment(rank, world, port, DS_ACCELERATOR="cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        # chosen when deepspeed was imported (this module imports it): DS_ACCELERATOR came from the parent
        assert get_accelerator().device_name() == "cpu"
        deepspeed.init_distributed(dist_backend="gloo")  # before TrainingArguments, which would start its own
        assert torch.distributed.get_backend() == "gloo"
        # every micro-batch fused, the head whole (gathered by ZeRO-3) when xent read it
        assert_patched_trains_as_unpatched(
            lambda tied, patched: _train(tied, patched, output_dir), lambda weight: (weight.numel(),), (HEAD_NUMEL,)
        )
        _refused_outside_the_engine()
        torch.distributed.barrier()
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_zero3_trainer_equals_unpatched(tmp_path, monkeypatch):
    # DeepSpeed picks its accelerator when imported, which the ranks do when they load this module
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_ranks(_worker, (WORLD, free_port(), str(tmp_path)), WORLD)
