"""xent.hf on a tensor-parallel LM head, on real processes (gloo): a Hugging Face model whose ``lm_head`` is
``ColwiseParallel`` (its weight a DTensor sharded on the vocabulary), patched, computes its training loss
vocab-parallel — each rank its rows, the logits never gathered — and equals the unsharded model's loss and every
gradient, and the same tensor-parallel model unpatched (which gathers its logits). The direct API refuses a DTensor
weight by name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import xent
import xent.hf
from tests.distributed.spawn import gloo_group, run_ranks
from tests.integrations.sharded_steps import assert_same, step
from tests.integrations.tiny_models import VOCAB, tiny_model


def _batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _worker(rank, world, store_path, failures):
    with gloo_group(rank, world, store_path, failures):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,))
        batch = _batch()
        # gemma2: its soft cap read from the forward; cohere: its logit scale. Untied: sharding the head alone would
        # untie a tied one, and the models compared would differ.
        for name in ("llama", "gemma2", "cohere"):
            single = tiny_model(name, seed=0, tie_word_embeddings=False)
            model = copy.deepcopy(single)
            parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
            expected = step(single, batch)  # one process, the whole head
            gathered = step(model, batch)  # tensor-parallel, unpatched: the logits gathered
            xent.hf.patch(model, chunk_size=4)
            got = step(model, batch)  # patched: vocab-parallel, never gathered
            assert_same(got, expected, f"{name} against the unsharded model")
            assert_same(got, gathered, f"{name} against the tensor-parallel model unpatched")
            # gradient accumulation as transformers.Trainer passes it
            assert_same(
                step(model, batch, num_items_in_batch=torch.tensor(40)),
                step(single, batch, num_items_in_batch=torch.tensor(40)),
                f"{name} num_items_in_batch",
            )
            # the direct API with the DTensor weight: refused by name, not PyTorch's mixed-tensor error
            hidden, tokens = torch.randn(5, single.config.hidden_size), torch.zeros(5, dtype=torch.long)
            sharded, whole = model.lm_head.weight, single.lm_head.weight.detach()
            for function, arguments in (
                (xent.linear_cross_entropy, (hidden, sharded, tokens)),
                (xent.linear_log_probs, (hidden, sharded, tokens)),
                (xent.linear_distillation_loss, (hidden, sharded, hidden, whole)),
            ):
                with pytest.raises(TypeError, match=r"linear_weight is a DTensor .*vocab_parallel_linear"):
                    function(*arguments)
            # options the vocab-parallel loss does not take are refused
            xent.hf.unpatch(model)
            xent.hf.patch(model, impl="chunked")
            with pytest.raises(TypeError, match="impl cannot be given for a tensor-parallel head"):
                step(model, batch)
        dist.barrier()  # no rank leaves while another is still in a collective (gloo aborts the latter otherwise)


def test_tensor_parallel_head_equals_the_unsharded_model(tmp_path):
    run_ranks(_worker, (2, str(tmp_path / "store")), 2)
