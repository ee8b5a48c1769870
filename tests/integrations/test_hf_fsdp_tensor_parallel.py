"""xent.hf on a 2-D mesh, FSDP2 × tensor parallelism, on four gloo processes: the LM head ``ColwiseParallel`` over
the mesh's ``tp`` dimension (its weight a DTensor sharded on the vocabulary), then every decoder layer and the root
sharded with ``fully_shard`` over its ``dp`` dimension. Inside the forward FSDP2 gathers the head over ``dp`` and
leaves it a ``tp`` shard; the patched loss computes vocab-parallel on that shard — the logits never gathered — and
the step equals the same 2-D model unpatched (which gathers its logits over ``tp``) and the unsharded model in one
process: loss, and every gradient gathered (``full_tensor()``).

Each ``dp`` group reads its own batch; the two ``tp`` ranks of a group read the same one (tensor parallelism splits
the model, not the batch), so the gathered gradients are the mean over the two batches of the unsharded model's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import xent.hf
from tests.distributed.spawn import gloo_group, run_ranks
from tests.integrations.sharded_steps import assert_same, step
from tests.integrations.tiny_models import VOCAB, tiny_model

DP, TP = 2, 2


def _batch(seed):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a prompt not trained on
    return {"input_ids": input_ids, "labels": labels}


def _two_d(model, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _worker(rank, world, store_path, failures):
    with gloo_group(rank, world, store_path, failures):
        from torch.distributed.device_mesh import init_device_mesh

        from xent.integrations import causal_lm_loss

        vocab_parallel = causal_lm_loss.vocab_parallel_linear_loss
        calls = []

        def counted(*args, **kwargs):  # the patched loss must take the vocab-parallel way on the tp shard
            calls.append(tuple(args[2].to_local().shape))
            return vocab_parallel(*args, **kwargs)

        causal_lm_loss.vocab_parallel_linear_loss = counted
        mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
        group = mesh["dp"].get_local_rank()
        batches = [_batch(seed) for seed in range(DP)]
        for name in ("llama", "gemma2"):  # gemma2: the head's soft cap, read from the forward
            single = tiny_model(name, seed=0, tie_word_embeddings=False)  # a TP head alone would untie a tied one
            # the unsharded model: the mean over the groups' batches of its loss gradients
            steps = [step(single, batch) for batch in batches]
            expected_grads = {key: sum(one[1][key] for one in steps) / DP for key in steps[0][1]}
            unpatched = _two_d(copy.deepcopy(single), mesh)
            patched = _two_d(xent.hf.patch(copy.deepcopy(single), chunk_size=4), mesh)
            calls.clear()
            got = step(patched, batches[group])
            rows = -(-VOCAB // TP) if mesh["tp"].get_local_rank() == 0 else VOCAB - -(-VOCAB // TP)
            assert calls == [(rows, single.config.hidden_size)]  # this rank's rows of the head, once
            assert_same(got, (steps[group][0], expected_grads), f"{name} against the unsharded model")
            assert_same(got, step(unpatched, batches[group]), f"{name} against the 2-D model unpatched")
        dist.barrier()  # no rank leaves while another is still in a collective


def test_fsdp2_by_tensor_parallel_equals_the_unsharded_model(tmp_path):
    run_ranks(_worker, (DP * TP, str(tmp_path / "store")), DP * TP)
