"""xent.hf under accelerate's FSDP2, through ``transformers.Trainer``, on 2 real processes (gloo, CPU): the Trainer's
accelerator shards the model with ``fully_shard`` (each decoder layer a unit, the embedding one, the final norm and
the head one group — the embedding in it when tied — and the root), every micro-batch of its gradient accumulation
fuses on the whole head (gathered by its group's pre-forward hook, which the final norm's forward fires),
and the patched model trains with the unpatched model's per-step losses and final weights — the head untied and tied.

accelerate 1.16 enables FSDP only on an accelerator: ``AcceleratorState.__init__`` (accelerate/state.py) sets
``distributed_type = DistributedType.FSDP`` and keeps the plugin only when the process group's type is one of
``MULTI_GPU``, ``MULTI_XPU``, ``MULTI_NPU``, … — ``MULTI_CPU`` (``use_cpu=True``, or no accelerator) is not among
them, so on CPU the plugin transformers builds from ``fsdp``/``fsdp_config`` is silently dropped and the Trainer
wraps the model in DDP (``trainer.is_fsdp_enabled`` is False). The ranks here undo that one gate: after the state's
own initialisation a ``MULTI_CPU`` state given an FSDP plugin is made ``FSDP`` with it, as it would be on GPUs.
Everything after it is accelerate's and transformers' own code (``fsdp2_prepare_model``, ``fully_shard`` on the CPU
device mesh, ``no_sync`` → ``set_requires_gradient_sync`` on the accumulation's first micro-batch, gradient
clipping on DTensors), and the test checks the model really is FSDP2-sharded.
"""

from __future__ import annotations

import traceback

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import xent.hf
from tests.distributed.spawn import run_ranks
from tests.integrations.tiny_models import COMMON, VOCAB, tiny_model
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

LAYERS = COMMON["num_hidden_layers"]
DEADLINE_S = 120
FSDP2 = {
    "fsdp": True,
    "fsdp_config": {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "reshard_after_forward": True,
    },
}


def _enable_fsdp_on_cpu() -> None:
    """Let accelerate's state keep its FSDP plugin on CPU (see the module's docstring): the one gate that drops it."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def _train(tied, patched, output_dir):
    """The per-step losses and every final weight (gathered) of one FSDP2 run from scratch."""
    import transformers
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    model = tiny_model("llama", seed=0, tie_word_embeddings=tied)
    initial = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    if patched:
        xent.hf.patch(model)
    trainer = transformers.Trainer(model=model, args=arguments(output_dir, **FSDP2), train_dataset=TokenData())
    assert trainer.is_fsdp_enabled
    assert trainer.accelerator.is_fsdp2
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS

    # sharded by FSDP2, every parameter a DTensor sharded on dim 0 over the 2 ranks
    assert isinstance(trainer.model_wrapped, FSDPModule)
    assert trainer.model_wrapped is model
    # accelerate's fsdp2_prepare_model: each decoder layer (the policy), the embedding (untied) and the tail — the
    # final norm and the head (the embedding with them when tied) in one group, not resharded after the forward —
    # then the root
    sharded = {id(module) for module in model.modules() if isinstance(module, FSDPModule)}
    expected = [model, model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]
    assert sharded == {id(module) for module in expected}
    assert len(model.model.layers) == LAYERS
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        assert isinstance(parameter, DTensor), name
        assert parameter.device_mesh.size() == WORLD and parameter.placements == (Shard(0),), name
    head = model.lm_head.weight
    assert head.to_local().shape[0] < head.shape[0] == VOCAB
    if tied:
        assert head is model.model.embed_tokens.weight

    weights = {name: parameter.full_tensor().detach().clone() for name, parameter in parameters.items()}
    assert weights.keys() == initial.keys()
    assert all(not torch.equal(weights[name], initial[name]) for name in weights)  # every weight trained
    return losses, weights


def _worker(rank, world, port, output_dir, failures):
    rank_environment(rank, world, port)
    try:
        _enable_fsdp_on_cpu()
        # every micro-batch fused on the whole head: a plain tensor, gathered by the final norm's and the head's group
        assert_patched_trains_as_unpatched(
            lambda tied, patched: _train(tied, patched, output_dir),
            lambda weight: (weight.numel(), type(weight).__name__),
            (HEAD_NUMEL, "Parameter"),
        )
        torch.distributed.barrier()
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_accelerate_fsdp2_trainer_equals_unpatched(tmp_path):
    run_ranks(_worker, (WORLD, free_port(), str(tmp_path)), WORLD, DEADLINE_S)
