"""Vocab-parallel losses on real processes (gloo): every rank's loss and shard gradients equal xent's loss of the full
logits and the slices of its gradients. Each rank runs the whole grid and checks itself against the reference, which
it computes from the full tensors (every rank builds them from the same seed)."""

from __future__ import annotations

import copy
import itertools
import traceback

import pytest
import torch
import torch.distributed as dist

import xent
from tests import family_samples
from tests.distributed.spawn import run_ranks
from xent.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_loss,
    vocab_parallel_loss,
)
from xent.losses.family import FAMILY

SHARDS = {2: [9, 14], 3: [5, 11, 7]}  # unequal slices of V = 23
OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 2.0},
    {"weighted": True},
    {"weighted": True, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0},
]
VOCAB = 23
# every loss of the registry with each of its samples: per-class options cover the whole vocabulary, the same on every
# rank; the soft cap is the test's own (a sample's is left out)
FAMILY_CASES = [
    (FAMILY[name].function, {key: value for key, value in options.items() if key != "softcap"})
    for name in FAMILY
    for options in family_samples.samples(VOCAB).get(name, [])
]
# the poisoned ignored rows (a masked class: no label smoothing) for a third of the family: cross-entropy and every
# third loss of the registry after it, each with its first sample that does not smooth the labels
POISONED_CASES = [
    (FAMILY[name].function, family_samples.first_unsmoothed(name, VOCAB))
    for name in ["cross_entropy", *[name for name in FAMILY if name != "cross_entropy"][::3]]
]
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2)}


def _problem(dtype, seed=0, shape=(3, 7), dim=None):
    generator = torch.Generator().manual_seed(seed)
    vocab = 23
    tensors = {
        "logits": (torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * 3).to(dtype),
        "target": torch.randint(vocab, shape, generator=generator),
        "weight": (torch.rand(vocab, generator=generator, dtype=torch.float64) + 0.2).to(dtype),
        "grad": torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype),
    }
    if dim is not None:
        tensors["input"] = torch.randn(*shape, dim, generator=generator, dtype=torch.float64).to(dtype)
        tensors["head"] = (torch.randn(vocab, dim, generator=generator, dtype=torch.float64) * 0.5).to(dtype)
        tensors["bias"] = torch.randn(vocab, generator=generator, dtype=torch.float64).to(dtype)
    tensors["target"].view(-1)[::4] = -100
    return tensors


def _slice(tensor, sizes, rank, dim=-1):
    return tensor.split(sizes, dim=dim)[rank]


def _close(actual, expected, dtype, what):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_logits_shards(rank, sizes, options_grid, dtypes):
    for options, reduction, dtype in itertools.product(options_grid, ["mean", "sum", "none"], dtypes):
        options = dict(options)
        t = _problem(dtype)
        weight = t["weight"] if options.pop("weighted", False) else None
        full = t["logits"].clone().requires_grad_()
        expected = xent.cross_entropy(full.flatten(0, -2), t["target"].flatten(), weight=weight, reduction=reduction,
                                      impl="reference", **options)  # fmt: skip
        expected = expected.view(t["target"].shape) if reduction == "none" else expected
        shard = _slice(t["logits"], sizes, rank).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(
            shard, t["target"], weight=None if weight is None else _slice(weight, sizes, rank), reduction=reduction,
            **options,
        )  # fmt: skip
        what = f"rank {rank} {options} weighted={weight is not None} {reduction} {dtype}"
        _close(loss, expected, dtype, what)
        grad_output = t["grad"].float() if reduction == "none" else None
        (expected * (1 if grad_output is None else grad_output.to(expected.dtype))).sum().backward()
        (loss * (1 if grad_output is None else grad_output.to(loss.dtype))).sum().backward()
        assert shard.grad.dtype == shard.dtype
        _close(shard.grad, _slice(full.grad, sizes, rank), dtype, what + " gradient")


def _check_linear_shards(rank, sizes, options_grid, dtypes):
    cases = itertools.product(options_grid, ["mean", "sum", "none"], dtypes, [False, True])
    for options, reduction, dtype, with_bias in cases:
        options = dict(options)
        t = _problem(dtype, seed=1, dim=6)
        weight = t["weight"] if options.pop("weighted", False) else None
        tensors = {name: t[name].clone().requires_grad_() for name in ("input", "head", "bias")}
        bias = tensors["bias"] if with_bias else None
        logits = torch.nn.functional.linear(tensors["input"], tensors["head"], bias)
        expected = xent.cross_entropy(logits.flatten(0, -2), t["target"].flatten(), weight=weight, reduction=reduction,
                                      impl="reference", **options)  # fmt: skip
        expected = expected.view(t["target"].shape) if reduction == "none" else expected
        mine = {name: value.detach().clone().requires_grad_() for name, value in tensors.items()}
        head_shard = _slice(mine["head"].detach(), sizes, rank, dim=0).clone().requires_grad_()
        bias_shard = _slice(mine["bias"].detach(), sizes, rank).clone().requires_grad_() if with_bias else None
        loss = vocab_parallel_linear_cross_entropy(
            mine["input"], head_shard, t["target"], linear_bias_shard=bias_shard, chunk_size=4,
            weight=None if weight is None else _slice(weight, sizes, rank), reduction=reduction, **options,
        )  # fmt: skip
        what = f"linear rank {rank} {options} weighted={weight is not None} {reduction} {dtype} bias={with_bias}"
        _close(loss, expected, dtype, what)
        scale = t["grad"] if reduction == "none" else torch.ones(())
        (expected * scale).sum().backward()
        (loss * scale).sum().backward()
        _close(mine["input"].grad, tensors["input"].grad, dtype, what + " d(input)")
        _close(head_shard.grad, _slice(tensors["head"].grad, sizes, rank, dim=0), dtype, what + " d(weight)")
        if with_bias:
            _close(bias_shard.grad, _slice(tensors["bias"].grad, sizes, rank), dtype, what + " d(bias)")


def _check_family(rank, sizes):
    """Every fused loss, on logits shards and on a weight-sharded head, weighted and capped, in float64."""
    for (loss_fn, options), reduction, softcap in itertools.product(FAMILY_CASES, ["mean", "none"], [None, 2.0]):
        t = _problem(torch.float64, seed=2, dim=6)
        weight = t["weight"]
        full = t["logits"].clone().requires_grad_()
        capped = full if softcap is None else softcap * torch.tanh(full / softcap)
        expected = loss_fn(capped.flatten(0, -2), t["target"].flatten(), weight=weight, reduction=reduction,
                           impl="reference", **options)  # fmt: skip
        expected = expected.view(t["target"].shape) if reduction == "none" else expected
        shard = _slice(t["logits"], sizes, rank).clone().requires_grad_()
        loss = vocab_parallel_loss(loss_fn, shard, t["target"], weight=_slice(weight, sizes, rank), reduction=reduction,
                                   softcap=softcap, **options)  # fmt: skip
        what = f"rank {rank} {loss_fn.__name__} {reduction} softcap={softcap}"
        _close(loss, expected, torch.float64, what)
        scale = t["grad"] if reduction == "none" else torch.ones((), dtype=torch.float64)
        (expected * scale).sum().backward()
        (loss * scale).sum().backward()
        _close(shard.grad, _slice(full.grad, sizes, rank), torch.float64, what + " gradient")

        hidden, head = t["input"].clone().requires_grad_(), t["head"].clone().requires_grad_()
        logits = torch.nn.functional.linear(hidden, head)
        logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
        expected = loss_fn(logits.flatten(0, -2), t["target"].flatten(), weight=weight, reduction=reduction,
                           impl="reference", **options)  # fmt: skip
        expected = expected.view(t["target"].shape) if reduction == "none" else expected
        my_hidden = t["input"].clone().requires_grad_()
        head_shard = _slice(t["head"], sizes, rank, dim=0).clone().requires_grad_()
        loss = vocab_parallel_linear_loss(loss_fn.__name__, my_hidden, head_shard, t["target"], chunk_size=5,
                                          weight=_slice(weight, sizes, rank), reduction=reduction, softcap=softcap,
                                          **options)  # fmt: skip
        _close(loss, expected, torch.float64, "linear " + what)
        (expected * scale).sum().backward()
        (loss * scale).sum().backward()
        _close(my_hidden.grad, hidden.grad, torch.float64, "linear " + what + " d(input)")
        _close(head_shard.grad, _slice(head.grad, sizes, rank, dim=0), torch.float64, "linear " + what + " d(weight)")


def _check_ignored_rows_are_absent(rank, sizes):
    """NaN/inf in ignored rows (of the logits, of a head's hidden states) and class 0 masked with -inf: the loss and
    gradients of the kept rows alone, by the reference on one process."""
    for (loss_fn, options), reduction in itertools.product(POISONED_CASES, ["mean", "none"]):
        t = _problem(torch.float64, seed=3, dim=6)
        target = torch.where(t["target"] == 0, 1, t["target"])  # class 0 is masked: no kept row targets it
        ignored = target == -100
        logits = t["logits"].clone()
        logits[..., 0] = -float("inf")
        logits[ignored] = float("nan")
        kept_logits = logits[~ignored].clone().requires_grad_()
        expected = loss_fn(kept_logits, target[~ignored], reduction=reduction, impl="reference", **options)
        shard = _slice(logits, sizes, rank).clone().requires_grad_()
        loss = vocab_parallel_loss(loss_fn, shard, target, reduction=reduction, **options)
        what = f"rank {rank} {loss_fn.__name__} {reduction} with poisoned ignored rows"
        _close(loss[~ignored] if reduction == "none" else loss, expected, torch.float64, what)
        scale = t["grad"] if reduction == "none" else torch.ones((), dtype=torch.float64)
        (expected * (scale[~ignored] if reduction == "none" else scale)).sum().backward()
        (loss * scale).sum().backward()
        _close(shard.grad[~ignored], _slice(kept_logits.grad, sizes, rank), torch.float64, what + " gradient")
        assert (shard.grad[ignored] == 0).all(), what

        hidden = t["input"].clone()
        hidden[ignored] = float("nan")
        bias = t["bias"].clone()
        bias[0] = -float("inf")
        kept_hidden, head, kept_bias = (x.clone().requires_grad_() for x in (hidden[~ignored], t["head"], bias))
        expected = xent.linear_loss(loss_fn, kept_hidden, head, target[~ignored], linear_bias=kept_bias,
                                    reduction=reduction, impl="reference", **options)  # fmt: skip
        my_hidden = hidden.clone().requires_grad_()
        head_shard = _slice(t["head"], sizes, rank, dim=0).clone().requires_grad_()
        bias_shard = _slice(bias, sizes, rank).clone().requires_grad_()
        loss = vocab_parallel_linear_loss(loss_fn, my_hidden, head_shard, target, linear_bias_shard=bias_shard,
                                          chunk_size=5, reduction=reduction, **options)  # fmt: skip
        _close(loss[~ignored] if reduction == "none" else loss, expected, torch.float64, "linear " + what)
        (expected * (scale[~ignored] if reduction == "none" else scale)).sum().backward()
        (loss * scale).sum().backward()
        _close(my_hidden.grad[~ignored], kept_hidden.grad, torch.float64, "linear " + what + " d(input)")
        assert (my_hidden.grad[ignored] == 0).all(), what
        _close(head_shard.grad, _slice(head.grad, sizes, rank, dim=0), torch.float64, "linear " + what + " d(weight)")
        _close(bias_shard.grad, _slice(kept_bias.grad, sizes, rank), torch.float64, "linear " + what + " d(bias)")


class Communication:
    """Counts the elements this rank sends through the collectives the vocab-parallel losses use."""

    def __enter__(self):
        self.elements, self.saved = 0, (dist.all_reduce, dist.all_gather)

        def all_reduce(tensor, *args, **kwargs):
            self.elements += tensor.numel()
            return self.saved[0](tensor, *args, **kwargs)

        def all_gather(outputs, tensor, *args, **kwargs):
            self.elements += tensor.numel()
            return self.saved[1](outputs, tensor, *args, **kwargs)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather
        return self

    def __exit__(self, *exc):
        dist.all_reduce, dist.all_gather = self.saved


AGREEMENT = 11  # the one agreement step: a fixed-size vector per rank (xent.distributed.agreement)


def _check_communication(rank, sizes):
    """O(rows) per rank: the agreement's vector once, then per row its max and four sums (target logit, sum of
    exponentials, smoothing sum, shards holding the target) — plus its target's weight when weighted; d(input) once
    for a linear head."""
    t = _problem(torch.float32, seed=3, shape=(4, 10), dim=6)
    rows = 40
    shard = _slice(t["logits"], sizes, rank).clone().requires_grad_()
    with Communication() as sent:
        vocab_parallel_cross_entropy(shard, t["target"], label_smoothing=0.1).backward()
    assert sent.elements == AGREEMENT + 5 * rows
    with Communication() as sent:
        vocab_parallel_cross_entropy(shard, t["target"], weight=_slice(t["weight"], sizes, rank)).backward()
    assert sent.elements == AGREEMENT + (rows + 1) + 5 * rows
    hidden = t["input"].clone().requires_grad_()
    head = _slice(t["head"], sizes, rank, dim=0).clone().requires_grad_()
    with Communication() as sent:
        vocab_parallel_linear_cross_entropy(hidden, head, t["target"], chunk_size=7).backward()
    assert sent.elements == AGREEMENT + 5 * rows + rows * 6  # statistics chunk by chunk, then d(input) (N × D) once


def _check_edges_and_errors(rank, sizes, world):
    t = _problem(torch.float32)
    shard = _slice(t["logits"], sizes, rank).clone().requires_grad_()
    ignored = torch.full_like(t["target"], -100)
    loss = vocab_parallel_cross_entropy(shard, ignored)  # nothing to average: 0, as xent.cross_entropy
    loss.backward()
    assert float(loss) == 0.0 and torch.all(shard.grad == 0)
    bad = t["target"].clone()
    bad[0, 0] = 23  # the vocabulary is 23 classes in all: out of range on every rank, so every rank raises
    with pytest.raises(ValueError, match="target"):
        vocab_parallel_cross_entropy(shard, bad)
    with pytest.raises(ValueError, match="logits_shard must have shape"):
        vocab_parallel_cross_entropy(shard, t["target"][:, :3])
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(shard, t["target"], label_smoothing=1.5)
    # second order: refused, never a silently missing gradient (the backward has no collective, so no rank waits)
    loss = vocab_parallel_cross_entropy(shard, t["target"])
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(loss, shard, create_graph=True)
    hidden = t["logits"][..., :6].clone().requires_grad_()
    head = torch.randn(sizes[rank], 6, requires_grad=True)
    loss = vocab_parallel_linear_cross_entropy(hidden, head, t["target"])
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(loss, (hidden, head), create_graph=True)
    # a bad weight on one rank only: every rank raises its error, naming it — none hangs (more in test_agreement.py)
    bad_weight = torch.ones(sizes[rank]) if rank else -torch.ones(sizes[rank])
    with pytest.raises(ValueError, match=r"^rank 0: weight must be non-negative"):
        vocab_parallel_cross_entropy(shard, t["target"], weight=bad_weight)
    with pytest.raises(TypeError, match="focal_loss has no option 'q'"):
        vocab_parallel_loss(xent.focal_loss, shard, t["target"], q=0.5)
    with pytest.raises(ValueError, match="class_counts"):  # the description sees the whole vocabulary
        vocab_parallel_loss(xent.ldam_loss, shard, t["target"], class_counts=torch.ones(sizes[rank]))
    # after the errors, the group still works: no rank was left waiting in a collective
    torch.testing.assert_close(
        vocab_parallel_cross_entropy(shard, t["target"]),
        xent.cross_entropy(t["logits"].flatten(0, 1), t["target"].flatten()),
    )
    # a DTensor sharded on the vocabulary, as torch's tensor parallelism produces it (its own, even-ish split)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = t["logits"].clone().requires_grad_()
    sharded = distribute_tensor(full, mesh, [Shard(-1)])
    loss = vocab_parallel_cross_entropy(sharded, t["target"], label_smoothing=0.1)
    torch.testing.assert_close(
        loss, xent.cross_entropy(t["logits"].flatten(0, 1), t["target"].flatten(), label_smoothing=0.1)
    )
    # torch's tensor parallelism: a column-parallel head that keeps its output sharded (README's recipe)
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 23))
    reference = copy.deepcopy(model)
    parallelize_module(model, mesh, {"1": ColwiseParallel(use_local_output=False)})
    x, y = torch.randn(5, 8), torch.randint(23, (5,))
    vocab_parallel_cross_entropy(model(x), y, z_loss=1e-2).backward()
    xent.cross_entropy(reference(x), y, z_loss=1e-2).backward()
    torch.testing.assert_close(model[1].weight.grad.full_tensor(), reference[1].weight.grad)
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad)  # the replicated trunk: full gradient


def _worker(rank, world, store_path, failures):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        sizes = SHARDS[world]
        # the whole grid on two ranks; on three (slower: 3 processes on few cores), every option at once
        options_grid, dtypes = (OPTIONS, list(TOLERANCE)) if world == 2 else (OPTIONS[::5], [torch.float64])
        _check_logits_shards(rank, sizes, options_grid, dtypes)
        _check_linear_shards(rank, sizes, options_grid, [dtype for dtype in dtypes if dtype != torch.bfloat16])
        if world == 2:
            _check_family(rank, sizes)
            _check_ignored_rows_are_absent(rank, sizes)
            _check_communication(rank, sizes)
        _check_edges_and_errors(rank, sizes, world)
        dist.barrier()  # no rank leaves while another is still in a collective (gloo aborts the latter otherwise)
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_full_loss_and_its_slice_of_the_gradients(world, tmp_path):
    run_ranks(_worker, (world, str(tmp_path / "store")), world)


def test_without_an_initialised_group_the_error_says_so():
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]))
