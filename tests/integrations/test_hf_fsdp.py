"""xent.hf.patch under FSDP2: the loss, the sharded gradients and the collectives of the unpatched FSDP2 model.

Two gloo processes on CPU, each with its own small batch (labels -100 on a prompt and on right padding), build two
copies of a tiny model from one seed — one patched with :func:`xent.hf.patch` (before ``fully_shard``, as a trainer
would get it; one case patches the sharded model), one left unpatched — shard both with ``fully_shard`` under the
same policy and run one training step on each (``model(input_ids, attention_mask, labels).loss.backward()``).

Two references:

* the unpatched FSDP2 model (same layout, same policy, same batches): each rank's loss and its local shard of every
  ``param.grad`` (a DTensor) must be the patched model's, and the step must issue exactly the same FSDP2 collectives
  (all-gathers and reduce-scatters, in the same order, of the same sizes and dtypes; no all-reduce, nothing else):
  the fused loss adds none, the head's weight is gathered as the unpatched model gathers it and its gradient is
  reduce-scattered once, with its unit's. They are logged twice: the torch.distributed functions FSDP2 calls
  (``all_gather_single`` and ``reduce_scatter_single`` in torch 2.13) and the others wrapped, and every collective
  op at the dispatcher (a TorchDispatchMode), the functional ones DTensor uses included. This is the reference of
  the mixed-precision case (bf16 parameters, float32 reduction), compared at bf16 tolerances.
* in float32, the unsharded model, independently, in the parent process, from materialised logits: each rank's loss
  on its batch, and the gathered gradients (``full_tensor()``) equal the average over the ranks of the unsharded
  model's, as FSDP2's reduce-scatter averages them.

Layouts: each decoder layer and the root sharded, ``reshard_after_forward`` torch's default (``None``: the layers
resharded after the forward, the root not), ``True`` and ``False`` for every unit. Llama untied and tied
(``tie_word_embeddings=True``), Gemma 2 (tied embeddings, a final logit soft cap). Gradient accumulation as
transformers.Trainer runs it: two micro-batches, ``set_requires_gradient_sync(False)`` on the first, ``labels`` and
``num_items_in_batch`` (the label tokens of the whole step, over the micro-batches and the ranks) given to the
forward and the loss multiplied by the number of ranks — the gradients are the global token mean's.

Outside the forward a sharded head's weight is a DTensor: ``xent.linear_cross_entropy(hidden, lm_head.weight, …)``
called there is refused by name, pointing to ``register_fsdp_forward_method``.

All cases run in one spawn of two processes (the imports dominate its time); the tests check its results.
"""

from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

import xent
import xent.hf
from tests.distributed.spawn import run_ranks
from tests.integrations.tiny_models import VOCAB, tiny_model

WORLD = 2
CHUNK = 8  # the 2 × 10 tokens of a batch in several chunks
BATCH, LENGTH = 2, 10
LAYERS = 2  # tiny_model's decoder layers: with the root, three FSDP2 units
DEADLINE_S = 120
# What FSDP2 (torch 2.13, _fsdp_collectives.py) calls, all_gather_single and reduce_scatter_single, an all_reduce for
# HSDP, and whatever else a step might add: each call is logged (outermost only, not the functions they call).
COLLECTIVES = (
    "all_gather_single",
    "reduce_scatter_single",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "broadcast",
    "all_to_all_single",
    "barrier",
)


@dataclass(frozen=True)
class Case:
    model: str
    reshard_after_forward: bool | None = None  # None: torch's default (True for the layers, False for the root)
    overrides: dict = field(default_factory=dict)  # of the tiny model's config
    mixed_precision: bool = False  # bf16 parameters, float32 reduction; no float reference
    accumulate: bool = False  # two micro-batches, num_items_in_batch, as transformers.Trainer
    patch_after_sharding: bool = False


CASES = {
    "llama": Case("llama"),
    "llama-reshard": Case("llama", True),
    "llama-no-reshard": Case("llama", False),
    "llama-tied": Case("llama", overrides={"tie_word_embeddings": True}),
    "gemma2": Case("gemma2"),
    "gemma2-reshard": Case("gemma2", True),
    "gemma2-no-reshard": Case("gemma2", False),
    "llama-patched-after-sharding": Case("llama", patch_after_sharding=True),
    "llama-bf16": Case("llama", mixed_precision=True),
    "gemma2-bf16": Case("gemma2", True, mixed_precision=True),
    "llama-accumulate": Case("llama", accumulate=True),
    "gemma2-accumulate": Case("gemma2", True, accumulate=True),
    "llama-no-reshard-accumulate": Case("llama", False, accumulate=True),
}
FLOAT_CASES = [name for name, case in CASES.items() if not case.mixed_precision]


def micro_batches(rank: int, case: Case) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A rank's micro-batches of (input_ids, attention_mask, labels): a prompt not trained on, right padding."""
    batches = []
    for index in range(2 if case.accumulate else 1):
        generator = torch.Generator().manual_seed(10 * rank + index)
        ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
        attention_mask = torch.ones_like(ids)
        attention_mask[1, -2 - index :] = 0
        labels = ids.masked_fill(attention_mask == 0, -100)
        labels[0, : 3 + index] = -100
        batches.append((ids, attention_mask, labels))
    return batches


def items_in_batch(case: Case) -> int | None:
    """With accumulation, as transformers.Trainer counts it (``average_tokens_across_devices``): the label tokens of
    the step, over its micro-batches and the ranks (computed, not all-reduced: no collective besides FSDP's)."""
    if not case.accumulate:
        return None
    return sum(int((labels[:, 1:] != -100).sum()) for rank in range(WORLD) for *_, labels in micro_batches(rank, case))


def shard(model: torch.nn.Module, case: Case) -> None:
    options: dict = {"mesh": init_device_mesh("cpu", (WORLD,))}
    if case.reshard_after_forward is not None:
        options["reshard_after_forward"] = case.reshard_after_forward
    if case.mixed_precision:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)


def build(case: Case, patched: bool) -> torch.nn.Module:
    model = tiny_model(case.model, **case.overrides)
    if patched and not case.patch_after_sharding:
        xent.hf.patch(model, chunk_size=CHUNK)
    shard(model, case)
    if patched and case.patch_after_sharding:
        xent.hf.patch(model, chunk_size=CHUNK)
    return model


class CollectiveLog:
    """Wraps torch.distributed's collectives in this process: while :attr:`entries` is a list, each outermost call
    is appended as ``(name, ((numel, dtype) of each tensor argument, …))``."""

    def __init__(self) -> None:
        self.entries: list | None = None
        self.depth = 0
        for name in COLLECTIVES:
            wrapped = self.wrap(name, getattr(c10d, name))
            setattr(dist, name, wrapped)  # FSDP2 calls them as dist.<name>
            setattr(c10d, name, wrapped)

    def wrap(self, name: str, original):
        def collective(*args, **kwargs):
            if self.entries is not None and self.depth == 0:
                tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
                self.entries.append((name, tuple((tensor.numel(), str(tensor.dtype)) for tensor in tensors)))
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1

        return collective


class DispatchedCollectives(TorchDispatchMode):
    """Every collective op the dispatcher runs, by name: those of torch.distributed's functions (``c10d.*``) and the
    functional ones DTensor's redistributions and ``full_tensor()`` use (``_c10d_functional.*``), which no Python
    function of torch.distributed sees."""

    NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in self.NAMESPACES:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def step(model: torch.nn.Module, case: Case, rank: int, log: CollectiveLog) -> dict:
    """One training step (its micro-batches, forward and backward): each micro-batch's loss, whether its logits were
    formed, the collectives it issued (torch.distributed's calls, and the collective ops dispatched), each
    parameter's local gradient shard and its gathered whole."""
    model.zero_grad(set_to_none=True)
    num_items = items_in_batch(case)
    batches = micro_batches(rank, case)
    losses, logits_formed = [], []
    log.entries = []
    try:
        with DispatchedCollectives() as dispatched:
            for index, (ids, attention_mask, labels) in enumerate(batches):
                model.set_requires_gradient_sync(index == len(batches) - 1)
                kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
                output = model(input_ids=ids, attention_mask=attention_mask, labels=labels, **kwargs)
                # transformers.Trainer multiplies by the ranks when num_items_in_batch counts all of theirs
                (output.loss if num_items is None else output.loss * WORLD).backward()
                losses.append(output.loss.detach().float())
                logits_formed.append(output.logits is not None)
        collectives = log.entries
    finally:
        log.entries = None
        model.set_requires_gradient_sync(True)
    parameters = dict(model.named_parameters())
    assert all(isinstance(parameter.grad, DTensor) for parameter in parameters.values())
    return {
        "losses": losses,
        "logits_formed": logits_formed,
        "collectives": collectives,
        "dispatched": dispatched.ops,
        "shards": {name: parameter.grad.to_local().clone() for name, parameter in parameters.items()},
        "whole": {name: parameter.grad.full_tensor() for name, parameter in parameters.items()},  # same order: ranks
    }


def refusal(rank: int) -> str:
    """``xent.linear_cross_entropy`` given a sharded head's weight outside the forward (a DTensor there): the error
    it raises, as ``"<type>: <message>"``."""
    model = build(Case("llama"), patched=False)
    weight = model.lm_head.weight
    assert isinstance(weight, DTensor), type(weight)
    hidden = torch.randn(4, weight.shape[1])
    target = torch.randint(VOCAB, (4,), generator=torch.Generator().manual_seed(rank))
    try:
        xent.linear_cross_entropy(hidden, weight, target)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    finally:
        del model
    return "no error"


def _worker(rank: int, world: int, store_path: str, out_dir: str, failures) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    log = CollectiveLog()
    try:
        for name, case in CASES.items():
            result: dict = {}
            try:  # a case that raises on every rank fails its own tests, not the others'
                unpatched = build(case, patched=False)
                result["unpatched"] = step(unpatched, case, rank, log)
                patched = build(case, patched=True)
                result["patched"] = step(patched, case, rank, log)
                del unpatched, patched
            except Exception:
                result["error"] = f"rank {rank}:\n{traceback.format_exc()}"
            torch.save(result, Path(out_dir) / f"{name}-{rank}.pt")
            dist.barrier()
        torch.save(refusal(rank), Path(out_dir) / f"refusal-{rank}.pt")
        # no rank leaves while another is still in a collective; FSDP's state goes before the group does
        dist.barrier()
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list]:
    """Each case's results, a dict per rank: ``patched`` and ``unpatched`` (see :func:`step`); and the refusal."""
    directory = tmp_path_factory.mktemp("hf-fsdp")
    run_ranks(_worker, (WORLD, str(directory / "store"), str(directory)), WORLD, DEADLINE_S)
    return {
        name: [torch.load(directory / f"{name}-{rank}.pt", weights_only=False) for rank in range(WORLD)]
        for name in [*CASES, "refusal"]
    }


def case_results(results: dict[str, list], name: str) -> list[dict]:
    """A case's results on each rank, or its failure (each rank's traceback)."""
    errors = [result["error"] for result in results[name] if "error" in result]
    if errors:
        pytest.fail("\n".join(errors))
    return results[name]


@functools.cache
def unsharded(name: str) -> tuple[list[list[torch.Tensor]], dict[str, torch.Tensor]]:
    """Each rank's micro-batch losses on the unsharded float model from its materialised logits, and the gradients
    FSDP's average over the ranks gives: of the mean of each rank's loss, or with accumulation of the step's
    token-mean over every micro-batch of every rank."""
    case = CASES[name]
    model = tiny_model(case.model, **case.overrides)
    num_items = items_in_batch(case)
    losses = []
    for rank in range(WORLD):
        losses.append([])
        for ids, attention_mask, labels in micro_batches(rank, case):
            logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]  # Gemma 2's soft cap applied
            token_losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
            )
            if num_items is None:
                loss = token_losses / (labels[:, 1:] != -100).sum()
                (loss / WORLD).backward()
            else:  # the rank's loss times WORLD, averaged over the WORLD ranks
                loss = token_losses / num_items
                loss.backward()
            losses[-1].append(loss.detach())
    return losses, {name: parameter.grad for name, parameter in model.named_parameters()}


def tolerances(case: Case, scale: float) -> dict:
    if case.mixed_precision:
        return {"rtol": 2e-2, "atol": 2e-2 * scale}
    return {"rtol": 1e-4, "atol": 1e-5 * scale}


def assert_same_gradients(case: Case, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, gradient in got.items():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(gradient, expected[name], **tolerances(case, scale), msg=name)


@pytest.mark.parametrize("name", list(CASES))
def test_the_loss_is_fused_and_the_unpatched_models(results, name):
    case = CASES[name]
    for result in case_results(results, name):
        assert result["patched"]["logits_formed"] == [False] * len(result["patched"]["losses"])  # xent's loss ran
        assert all(result["unpatched"]["logits_formed"])
        for got, expected in zip(result["patched"]["losses"], result["unpatched"]["losses"], strict=True):
            torch.testing.assert_close(got, expected, **tolerances(case, 1.0))


@pytest.mark.parametrize("name", FLOAT_CASES)
def test_the_loss_is_the_unsharded_models(results, name):
    expected, _ = unsharded(name)
    for rank, result in enumerate(case_results(results, name)):
        for key in ("patched", "unpatched"):
            for got, want in zip(result[key]["losses"], expected[rank], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{key} rank {rank}")


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_shards_are_the_unpatched_models(results, name):
    for result in case_results(results, name):
        assert_same_gradients(CASES[name], result["patched"]["shards"], result["unpatched"]["shards"])
        assert_same_gradients(CASES[name], result["patched"]["whole"], result["unpatched"]["whole"])


@pytest.mark.parametrize("name", FLOAT_CASES)
def test_gradients_are_the_average_of_the_unsharded_models(results, name):
    """The gathered gradients, on each rank, are the unsharded model's averaged over the ranks' batches (with
    accumulation: the global token mean's): FSDP2 reduced the patched model's gradients as the unpatched model's."""
    _, expected = unsharded(name)
    for result in case_results(results, name):
        assert_same_gradients(CASES[name], result["unpatched"]["whole"], expected)
        assert_same_gradients(CASES[name], result["patched"]["whole"], expected)


def expected_collective_counts(case: Case) -> dict[str, int]:
    """FSDP2's collectives in a step of the three units (two layers and the root): each unit gathered once per
    micro-batch's forward and again in its backward if resharded after the forward; each unit's gradient
    reduce-scattered once, at the last micro-batch."""
    micro = 2 if case.accumulate else 1
    resharded = {None: LAYERS, True: LAYERS + 1, False: 0}[case.reshard_after_forward]
    return {"all_gather_single": micro * (LAYERS + 1 + resharded), "reduce_scatter_single": LAYERS + 1}


@pytest.mark.parametrize("name", list(CASES))
def test_the_patched_step_issues_the_unpatched_steps_collectives(results, name):
    """Nothing added or left out: the same all-gathers (the head's weight gathered with its unit as the unpatched
    model gathers it) and reduce-scatters (the head's gradient reduced once, with its unit's), in the same order,
    of the same sizes and dtypes; no all-reduce."""
    for result in case_results(results, name):
        patched, unpatched = result["patched"]["collectives"], result["unpatched"]["collectives"]
        assert patched == unpatched
        counts: dict[str, int] = {}
        for collective, _ in patched:
            counts[collective] = counts.get(collective, 0) + 1
        assert counts == expected_collective_counts(CASES[name])
        # at the dispatcher: the same, and no functional collective (a DTensor redistributed or gathered)
        assert result["patched"]["dispatched"] == result["unpatched"]["dispatched"]
        dispatched = {"c10d._allgather_base_.default": "all_gather_single"}
        dispatched["c10d._reduce_scatter_base_.default"] = "reduce_scatter_single"
        assert [dispatched.get(op, op) for op in result["patched"]["dispatched"]] == [op for op, _ in patched]
        if CASES[name].mixed_precision:  # gathered in bf16, reduced in float32
            gathers = {dtype for collective, tensors in patched for _, dtype in tensors if collective[:3] == "all"}
            reductions = {dtype for collective, tensors in patched for _, dtype in tensors if collective[:3] == "red"}
            assert gathers == {"torch.bfloat16"} and reductions == {"torch.float32"}


def test_a_sharded_weight_outside_the_forward_is_refused(results):
    """Outside the forward FSDP2's parameters are DTensor shards: xent's linear losses refuse one by name (not
    PyTorch's error on mixed torch.Tensor and DTensor arguments), saying where the weight is whole."""
    for message in results["refusal"]:
        assert message.startswith("TypeError: "), message
        assert "is a DTensor" in message and "register_fsdp_forward_method" in message, message
