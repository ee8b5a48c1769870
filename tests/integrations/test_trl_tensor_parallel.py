"""xent's fused head (xent.trl) on a tensor-parallel LM head, on real processes (gloo): the head's weight a DTensor
sharded on the vocabulary (``ColwiseParallel``), each rank computing its rows of the vocabulary
(:func:`xent.distributed.vocab_parallel_linear_token_outputs`) where TRL's head gathers the whole head. Every output
TRL returns and every gradient (the head's shard, the replicated trunk) equal TRL's head on the same model."""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl")

from tests.distributed.spawn import run_ranks
from tests.integrations.test_trl import sharpened
from tests.integrations.tiny_models import VOCAB

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def _step(model, inputs, labels):
    """Every output of the fused forward, and the gradients of Σ log p + 0.3 Σ H (the head's as a full tensor)."""
    from torch.distributed.tensor import DTensor

    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=labels, fused_lm_head=True, num_items_in_batch=torch.tensor(13))
    (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
    grads = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        grads[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    return {field: out[field].detach() for field in (*OUTPUTS, "loss")}, grads


def _worker(rank, world, store_path, failures):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
        from trl.trainer.utils import add_fused_lm_head

        from xent.integrations import trl_head

        mesh = init_device_mesh("cpu", (world,))
        inputs, labels = _batch()
        for name in ("llama", "gemma2"):  # gemma2: its soft cap, read from the forward
            # untied: sharding the head alone unties a tied one, which would make the two models differ
            single = sharpened(name, seed=0, tie_word_embeddings=False)
            model = copy.deepcopy(single)
            parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
            add_fused_lm_head(single, temperature=0.7, outputs=OUTPUTS)
            add_fused_lm_head(model, temperature=0.7, outputs=OUTPUTS)
            expected, expected_grads = _step(single, inputs, labels)  # TRL's head, one process, no sharding
            trl_outputs, trl_grads = _step(model, inputs, labels)  # TRL's head gathering the sharded one
            trl_head.install(model, chunk_size=4)
            got, got_grads = _step(model, inputs, labels)  # xent's, each rank its rows of the vocabulary
            assert isinstance(model.lm_head.weight, torch.distributed.tensor.DTensor)
            for reference in (expected, trl_outputs):
                for field, value in reference.items():
                    if field == "is_top1":
                        assert torch.equal(got[field], value), (name, field)
                    else:
                        torch.testing.assert_close(got[field], value, rtol=1e-5, atol=1e-6, msg=f"{name} {field}")
            for reference in (expected_grads, trl_grads):
                for parameter, grad in reference.items():
                    scale = grad.abs().max().item()
                    torch.testing.assert_close(got_grads[parameter], grad, rtol=1e-4, atol=1e-5 * scale,
                                               msg=f"{name} {parameter}")  # fmt: skip
        dist.barrier()  # no rank leaves while another is still in a collective (gloo aborts the latter otherwise)
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_head_equals_trl(tmp_path):
    run_ranks(_worker, (2, str(tmp_path / "store")), 2)
