"""xent.hf under DeepSpeed ZeRO-3, through ``transformers.Trainer``, on 2 real processes (gloo, DeepSpeed's CPU
accelerator): ZeRO-3 partitions every parameter and gathers one read inside the engine's forward, where xent's fused
step reads the head, so the patched model fuses every micro-batch on the whole head and trains with the unpatched
model's losses and final weights — the head untied (the model built under ``deepspeed.zero.Init``, as
``from_pretrained`` builds it) and tied (built whole, partitioned by the engine). A head still partitioned when xent
reads it (the model inside the module DeepSpeed holds, called on its own: outside the engine's forward) is refused
by name."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

import xent.hf
from tests.distributed.spawn import run_ranks
from tests.integrations.tiny_models import COMMON, VOCAB, tiny_model

WORLD = 2
HEAD_NUMEL = VOCAB * COMMON["hidden_size"]
STEPS, ACCUMULATION, BATCH, LENGTH = 3, 2, 2, 10
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


class _Data(torch.utils.data.Dataset):
    """Fixed token ids, their labels partly -100 (unevenly across rows, so that gradient accumulation's
    normalisation by the micro-batches' token count matters)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        rows = WORLD * BATCH * ACCUMULATION * STEPS
        self.input_ids = torch.randint(3, VOCAB, (rows, LENGTH), generator=generator)
        self.labels = self.input_ids.clone()
        for row in range(rows):
            self.labels[row, : row % 5] = -100

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def _arguments(output_dir):
    import transformers

    return transformers.TrainingArguments(
        output_dir=output_dir,
        deepspeed=ZERO3,  # ZeRO-3 enabled from here on (transformers holds the config while these arguments live)
        use_cpu=True,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        learning_rate=1e-3,
        # Adam moves a weight by about the learning rate whatever its gradient's size: a larger epsilon keeps the
        # gradients' last-bit differences (the fused loss sums in another order) from moving tiny-gradient weights
        adam_epsilon=1e-6,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _train(tied, patched, output_dir):
    """The per-step losses and every final weight (gathered) of one ZeRO-3 run from scratch."""
    import deepspeed
    import transformers

    arguments = _arguments(output_dir)
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
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_Data())
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
    batch = _Data()[0]
    with pytest.raises(
        TypeError, match=rf"partitioned by DeepSpeed ZeRO-3 and was not gathered .* 0 of its {HEAD_NUMEL}"
    ):
        model(input_ids=batch["input_ids"][None], labels=batch["labels"][None])


def _worker(rank, world, port, output_dir, failures):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        # chosen when deepspeed was imported (this module imports it): DS_ACCELERATOR came from the parent
        assert get_accelerator().device_name() == "cpu"
        deepspeed.init_distributed(dist_backend="gloo")  # before TrainingArguments, which would start its own
        assert torch.distributed.get_backend() == "gloo"

        from xent.integrations.causal_lm_loss import FusedLoss

        fused_calls = []
        original = FusedLoss.causal_lm_loss

        def counted(self, logits, labels, shift_labels, vocab_size, num_items_in_batch, *args):
            # the head's elements when xent read it, and whether the Trainer passed its accumulation's token count
            fused_calls.append((logits.head.weight.numel(), num_items_in_batch is not None))
            return original(self, logits, labels, shift_labels, vocab_size, num_items_in_batch, *args)

        FusedLoss.causal_lm_loss = counted
        try:
            for tied in (False, True):
                expected_losses, expected_weights = _train(tied, False, output_dir)
                assert not fused_calls
                losses, weights = _train(tied, True, output_dir)
                # every micro-batch fused, the head whole (gathered by ZeRO-3) when xent read it
                assert fused_calls == [(HEAD_NUMEL, True)] * (STEPS * ACCUMULATION), fused_calls
                fused_calls.clear()
                torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=0)
                assert weights.keys() == expected_weights.keys()
                for name, weight in expected_weights.items():
                    message = f"tied={tied} {name}"
                    torch.testing.assert_close(
                        weights[name],
                        weight,
                        rtol=1e-5,
                        atol=1e-6,
                        msg=lambda detail, message=message: f"{message}: {detail}",
                    )
            _refused_outside_the_engine()
        finally:
            FusedLoss.causal_lm_loss = original
        torch.distributed.barrier()
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_zero3_trainer_equals_unpatched(tmp_path, monkeypatch):
    # DeepSpeed picks its accelerator when imported, which the ranks do when they load this module
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_ranks(_worker, (WORLD, _free_port(), str(tmp_path)), WORLD)
