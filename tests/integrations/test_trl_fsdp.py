"""xent.trl's fused LM head under FSDP2: the outputs and the sharded gradients of TRL's own fused head.

Two gloo processes on CPU, each with its own small batch (labels -100 on a prompt and on right padding), shard a tiny
model with ``fully_shard`` and run, on the same model object, TRL 1.16's fused forward (``add_fused_lm_head``) then
xent's (:func:`xent.integrations.trl_head.install`): ``model(..., labels=…, fused_lm_head=True)`` and a backward of
its loss plus a multiple of its entropy. Each rank's log-probs, entropy, loss and local shard of every ``param.grad``
(a DTensor) must be TRL's; independently, the parent process computes them on the unsharded model from materialised
logits (``log_softmax``), and the gathered gradients must be the average of the ranks' as FSDP reduces them.

Layouts: each decoder layer and the root sharded (torch's default ``reshard_after_forward=None``: the root's
parameters stay unsharded after the forward, the layers' are resharded; and ``True`` for all, the root included); and
accelerate 1.16's FSDP2 layout (the layers, the input embeddings and a ``[final norm, lm_head]`` unit not resharded
after the forward, the root at torch's default). Llama, and Gemma 2 for its soft cap and tied embeddings. One case
gives a rank only -100 labels: that rank's loss is a differentiable zero and the step neither hangs nor fails.

All cases run in one spawn of two processes (the imports dominate its time); the tests check its results. The root
resharded after the forward (``reshard_after_forward=True`` on the root, as accelerate before 1.16 and axolotl shard
it) is the case a head that re-entered the model's ``__call__`` got wrong: FSDP2's root hooks ran twice and resharded
the head before it was read.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from trl.trainer.utils import add_fused_lm_head

from tests.distributed.spawn import run_ranks
from tests.integrations.tiny_models import VOCAB, tiny_model
from xent.integrations import distill, trl_head

WORLD = 2
TEMPERATURE = 0.7
OUTPUTS = ("log_probs", "entropy")
ENTROPY_WEIGHT = 0.1  # the entropy's gradient is compared too
CHUNK = 8  # the vocabulary (97) in several chunks
BATCH, LENGTH = 2, 10
DEADLINE_S = 120


@dataclass(frozen=True)
class Case:
    model: str
    layout: str  # "layers+root" (each decoder layer and the root) or "accelerate" (accelerate 1.16's FSDP2 layout)
    reshard_after_forward: bool | None  # None: torch's default (True for the layers, False for the root)
    all_masked: bool = False  # the last rank's labels all -100


CASES = {
    "llama": Case("llama", "layers+root", None),
    "gemma2": Case("gemma2", "layers+root", None),
    "llama-reshard": Case("llama", "layers+root", True),
    "gemma2-reshard": Case("gemma2", "layers+root", True),
    "llama-accelerate": Case("llama", "accelerate", True),
    "gemma2-accelerate": Case("gemma2", "accelerate", True),
    "llama-all-masked": Case("llama", "layers+root", None, all_masked=True),
    "llama-reshard-all-masked": Case("llama", "layers+root", True, all_masked=True),
}


def batch(rank: int, all_masked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank's (input_ids, attention_mask, labels): a prompt not trained on, right padding; or no label at all."""
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -2:] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[0, :3] = -100
    if all_masked and rank == WORLD - 1:
        labels[:] = -100
    return ids, attention_mask, labels


def objective(loss: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    return loss + ENTROPY_WEIGHT * entropy.sum()


def shard(model: torch.nn.Module, case: Case) -> None:
    mesh = init_device_mesh("cpu", (WORLD,))
    options: dict = {"mesh": mesh}
    if case.reshard_after_forward is not None:
        options["reshard_after_forward"] = case.reshard_after_forward
    for layer in model.model.layers:
        fully_shard(layer, **options)
    if case.layout == "accelerate":  # accelerate.utils.fsdp_utils.fsdp2_prepare_model (1.16)
        embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = embeddings.weight is head.weight
        if not tied:
            fully_shard(embeddings, **options)
        tail = [model.model.norm, embeddings, head] if tied else [model.model.norm, head]
        fully_shard(tail, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh)
    else:
        fully_shard(model, **options)


def fused_step(model: torch.nn.Module, ids, attention_mask, labels) -> dict:
    """One fused forward and backward: the outputs, each parameter's local gradient shard and its gathered whole."""
    model.zero_grad(set_to_none=True)
    output = model(input_ids=ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    objective(output.loss, output.entropy).backward()
    parameters = dict(model.named_parameters())
    assert all(isinstance(parameter.grad, DTensor) for parameter in parameters.values())
    return {
        "loss": output.loss.detach(),
        "log_probs": output.log_probs.detach(),
        "entropy": output.entropy.detach(),
        "label_mask": output.label_mask,
        "shards": {name: parameter.grad.to_local().clone() for name, parameter in parameters.items()},
        "whole": {name: parameter.grad.full_tensor() for name, parameter in parameters.items()},  # same order: ranks
    }


def _worker(rank: int, world: int, store_path: str, out_dir: str, failures) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    read: list[str] = []  # what the head's weight was when xent's head read it from the forward

    class RecordedHeadLogits(distill.HeadLogits):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            read.append(type(self.weight).__name__)

    distill.HeadLogits = RecordedHeadLogits  # this process's: the logits read by the model's forward
    try:
        for name, case in CASES.items():
            model = tiny_model(case.model)
            add_fused_lm_head(model, temperature=TEMPERATURE, outputs=OUTPUTS)  # as TRL's trainers, before FSDP
            shard(model, case)
            inputs = batch(rank, case.all_masked)
            result: dict = {}
            try:  # a case that raises on every rank fails its own tests, not the others'
                result["trl"] = fused_step(model, *inputs)
                original = trl_head.install(model, chunk_size=CHUNK)
                read.clear()
                result["xent"] = fused_step(model, *inputs)
                trl_head.restore(model, original)
            except Exception:
                result["error"] = f"rank {rank}:\n{traceback.format_exc()}"
            torch.save({**result, "read": list(read)}, Path(out_dir) / f"{name}-{rank}.pt")
            dist.barrier()
        # the head an FSDP2 unit of its own, resharded after its call: refused, never read freed or unreduced
        model = tiny_model("llama")
        add_fused_lm_head(model, temperature=TEMPERATURE, outputs=OUTPUTS)
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        trl_head.install(model, chunk_size=CHUNK)
        try:
            fused_step(model, *batch(rank, False))
            refusal = "no error"
        except TypeError as error:
            refusal = str(error)
        torch.save(refusal, Path(out_dir) / f"head-unit-{rank}.pt")
        dist.barrier()
        # no rank leaves while another is still in a collective; FSDP's state goes before the group does (test_hf's
        # DDP test hung in the group's teardown otherwise)
        dist.barrier()
        del model
        dist.barrier()
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    """Each case's results, a dict per rank: ``trl`` and ``xent`` (see :func:`fused_step`) and ``read``."""
    directory = tmp_path_factory.mktemp("fsdp")
    run_ranks(_worker, (WORLD, str(directory / "store"), str(directory)), WORLD, DEADLINE_S)
    return {
        name: [torch.load(directory / f"{name}-{rank}.pt", weights_only=False) for rank in range(WORLD)]
        for name in [*CASES, "head-unit"]
    }


def case_results(results: dict[str, list[dict]], name: str) -> list[dict]:
    """A case's results on each rank, or its failure (each rank's traceback)."""
    errors = [result["error"] for result in results[name] if "error" in result]
    if errors:
        pytest.fail("\n".join(errors))
    return results[name]


def unsharded(case: Case) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Each rank's outputs on the unsharded model from its materialised logits, and the gradients FSDP's average
    over the ranks gives."""
    model = tiny_model(case.model)
    outputs = []
    for rank in range(WORLD):
        ids, attention_mask, labels = batch(rank, case.all_masked)
        logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]  # Gemma 2's soft cap applied
        log_softmax = (logits / TEMPERATURE).log_softmax(-1)
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs = log_softmax.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).where(mask, 0)
        entropy = -(log_softmax.exp() * log_softmax).sum(-1).where(mask, 0)
        loss = -log_probs.sum() / mask.sum().clamp(min=1)
        (objective(loss, entropy) / WORLD).backward()
        outputs.append({"loss": loss, "log_probs": log_probs, "entropy": entropy, "label_mask": mask})
    return outputs, {name: parameter.grad for name, parameter in model.named_parameters()}


def assert_same_outputs(got: dict, expected: dict) -> None:
    assert torch.equal(got["label_mask"], expected["label_mask"])
    for key in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(got[key], expected[key].detach(), rtol=1e-5, atol=1e-6, msg=key)


def assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, gradient in got.items():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(gradient, expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_are_trls_and_the_unsharded_models(results, name):
    case = CASES[name]
    reference, _ = unsharded(case)
    for rank, result in enumerate(case_results(results, name)):
        assert_same_outputs(result["xent"], result["trl"])
        assert_same_outputs(result["xent"], reference[rank])
        assert_same_outputs(result["trl"], reference[rank])
    if case.all_masked:  # the rank without labels: a zero loss, zero outputs
        masked = case_results(results, name)[-1]["xent"]
        assert masked["loss"].item() == 0 and not masked["label_mask"].any()
        assert not masked["log_probs"].any() and not masked["entropy"].any()


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_shards_are_trls(results, name):
    for result in case_results(results, name):
        assert_same_gradients(result["xent"]["shards"], result["trl"]["shards"])


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_are_the_average_of_the_unsharded_models(results, name):
    """The gathered gradients, on each rank, are the unsharded model's averaged over the ranks' batches (with no
    contribution from a rank without labels): FSDP reduced xent's gradients as it reduces TRL's."""
    _, expected = unsharded(CASES[name])
    for result in case_results(results, name):
        assert_same_gradients(result["trl"]["whole"], expected)
        assert_same_gradients(result["xent"]["whole"], expected)


@pytest.mark.parametrize("name", list(CASES))
def test_the_head_reads_fsdps_unsharded_weight(results, name):
    """xent's head reads the head's weight while FSDP holds it unsharded (a plain tensor, as TRL's head reads it in
    these layouts), so that FSDP's reduce-scatter averages its gradient over the ranks."""
    for result in case_results(results, name):
        assert result["read"] == ["Parameter"]  # one reading of the logits (a HeadLogits) per fused forward


def test_a_head_sharded_as_a_unit_of_its_own_is_refused(results):
    """FSDP2 reshards a unit of its own after its call (its weight freed before xent's head reads it), and a
    gathered shard's gradient would bypass FSDP's reduction: refused by name on every rank."""
    for refusal in results["head-unit"]:
        assert "shard the head with its parent module" in refusal, refusal
        assert refusal.startswith("FSDPLlamaForCausalLM's head weight"), refusal
