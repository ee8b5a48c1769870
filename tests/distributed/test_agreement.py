"""The vocab-parallel losses' one agreement step, on three gloo processes with unequal shards: an argument that is
bad on one rank only, or that differs between ranks, makes every rank raise the same error naming the rank and the
argument — no rank waits in a collective another never joins, none returns a wrong loss — and, with value checks
off, a row whose target no shard holds is NaN. Every case runs in one spawned group, one after the other: a rank
left behind in a collective would break the next case, and the deadline fails the test rather than hanging it."""

from __future__ import annotations

import datetime
import re
import traceback

import torch
import torch.distributed as dist

import xent
from tests.distributed.spawn import run_ranks
from xent.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_loss,
)

WORLD = 3
SIZES = [5, 11, 7]  # V = 23
VOCAB = sum(SIZES)
DEADLINE_S = 150  # the cases take seconds; a hang fails the test here, or in gloo's own 60 s timeout before it
COUNTS = torch.arange(VOCAB, 0, -1, dtype=torch.float64) ** 2


def _problem(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(VOCAB, (3, 7), generator=generator)
    target.view(-1)[::4] = -100  # positions 0, 4, 8, … are ignored
    return {
        "logits": torch.randn(3, 7, VOCAB, generator=generator, dtype=torch.float64).to(dtype),
        "target": target,
        "hidden": torch.randn(3, 7, 6, generator=generator, dtype=torch.float64).to(dtype),
        "head": torch.randn(VOCAB, 6, generator=generator, dtype=torch.float64).to(dtype),
        "weight": torch.rand(VOCAB, generator=generator, dtype=torch.float64).to(dtype) + 0.2,
    }


def _mine(tensor, rank, dim=-1):
    return tensor.split(SIZES, dim=dim)[rank]


def _disagreements(rank):
    """``(case, call, error type, pattern)``: the call each rank makes, and what every rank must raise."""
    t = _problem()
    logits, target, hidden, weight = _mine(t["logits"], rank), t["target"], t["hidden"], _mine(t["weight"], rank)
    head = _mine(t["head"], rank, dim=0)

    def on(ranks, value, otherwise):
        return value if rank in ranks else otherwise

    def changed(position, value):
        bad = target.clone()
        bad.view(-1)[position] = value
        return bad

    yield (
        "label_smoothing on one rank",
        lambda: vocab_parallel_cross_entropy(logits, target, label_smoothing=on({1}, 0.1, 0.0)),
        ValueError,
        r"label_smoothing differs between ranks: 0\.0 on ranks 0, 2; 0\.1 on rank 1",
    )
    yield (
        "a different valid target on one rank",
        lambda: vocab_parallel_cross_entropy(logits, on({2}, changed(3, (int(target.view(-1)[3]) + 1) % 23), target)),
        ValueError,
        r"target differs between ranks: .* on ranks 0, 1; .* on rank 2",
    )
    yield (
        "float64 on one rank",
        lambda: vocab_parallel_cross_entropy(on({1}, logits.double(), logits), target),
        ValueError,
        r"logits_shard's dtype differs between ranks: torch\.float32 on ranks 0, 2; torch\.float64 on rank 1",
    )
    yield (
        "a target out of range on one rank",
        lambda: vocab_parallel_cross_entropy(logits, on({1}, changed(3, 70), target)),
        ValueError,
        r"^rank 1: target holds class index 70 at position 3 .*outside \[0, 23\)",
    )
    yield (
        "a negative target other than ignore_index on one rank",
        lambda: vocab_parallel_cross_entropy(logits, on({2}, changed(9, -5), target)),
        ValueError,
        r"^rank 2: target holds class index -5 at position 9 .*ignore_index=-100",
    )
    yield (
        "a bad shard shape on one rank",
        lambda: vocab_parallel_cross_entropy(on({0}, logits[:, :5], logits), target),
        ValueError,
        r"^rank 0: logits_shard must have shape",
    )
    yield (
        "different N, logits form",
        lambda: vocab_parallel_cross_entropy(on({1}, logits[:2], logits), on({1}, target[:2], target)),
        ValueError,
        r"target differs between ranks: .*\(3, 7\).* on ranks 0, 2; .*\(2, 7\).* on rank 1",
    )
    yield (
        "different N, linear form",
        lambda: vocab_parallel_linear_cross_entropy(
            on({2}, hidden[:2], hidden), head, on({2}, target[:2], target), chunk_size=4
        ),
        ValueError,
        r"input's shape differs between ranks: \(3, 7, 6\) on ranks 0, 1; \(2, 7, 6\) on rank 2",
    )
    yield (
        "different D, linear form",
        lambda: vocab_parallel_linear_cross_entropy(
            on({1}, hidden[..., :5], hidden), on({1}, head[:, :5], head), target
        ),
        ValueError,
        r"input's shape differs between ranks: \(3, 7, 6\) on ranks 0, 2; \(3, 7, 5\) on rank 1",
    )
    yield (
        "the input's dtype on one rank, linear form",
        lambda: vocab_parallel_linear_cross_entropy(
            on({0}, hidden.double(), hidden), on({0}, head.double(), head), target
        ),
        ValueError,
        r"input's dtype differs between ranks: torch\.float64 on rank 0; torch\.float32 on ranks 1, 2",
    )
    yield (
        "an unknown option on one rank",
        lambda: vocab_parallel_loss(xent.focal_loss, logits, target, gamma=2.0, **on({1}, {"q": 0.5}, {})),
        TypeError,
        r"^rank 1: focal_loss has no option 'q'",
    )
    yield (
        "a floating target on one rank",
        lambda: vocab_parallel_cross_entropy(logits, on({0}, target.double(), target)),
        TypeError,
        r"^rank 0: target must hold integer class indices",
    )
    yield (
        "a bad option on one rank",
        lambda: vocab_parallel_cross_entropy(logits, target, label_smoothing=on({2}, 1.5, 0.0)),
        ValueError,
        r"^rank 2: label_smoothing must be in \[0, 1\], got 1\.5",
    )
    yield (
        "a negative weight on one rank",
        lambda: vocab_parallel_cross_entropy(logits, target, weight=on({0}, -weight, weight)),
        ValueError,
        r"^rank 0: weight must be non-negative",
    )
    yield (
        "a weight on some ranks only",
        lambda: vocab_parallel_cross_entropy(logits, target, weight=on({2}, None, weight)),
        ValueError,
        r"weight differs between ranks: a tensor on ranks 0, 1; None on rank 2",
    )
    yield (
        "reduction on one rank",
        lambda: vocab_parallel_cross_entropy(logits, target, reduction=on({2}, "sum", "mean")),
        ValueError,
        r"reduction differs between ranks: 'mean' on ranks 0, 1; 'sum' on rank 2",
    )
    yield (
        "a different loss on one rank",
        lambda: vocab_parallel_loss(on({1}, xent.focal_loss, xent.cross_entropy), logits, target),
        ValueError,
        r"loss differs between ranks: 'cross_entropy' on ranks 0, 2; 'focal_loss' on rank 1",
    )
    yield (
        "per-class counts that differ on one rank",
        lambda: vocab_parallel_loss(xent.ldam_loss, logits, target, class_counts=on({1}, COUNTS + 1, COUNTS)),
        ValueError,
        r"class_counts differs between ranks: .* on ranks 0, 2; .* on rank 1",
    )
    yield (
        "value checks on one rank only, a target out of range on every rank",
        lambda: _with_value_checks(rank == 0, lambda: vocab_parallel_cross_entropy(logits, changed(5, 23))),
        ValueError,
        r"^ranks 0, 1, 2: target holds class index 23 at position 5 ",
    )


def _with_value_checks(enabled, call):
    with xent.value_checks(enabled):
        return call()


def _check_disagreements(rank):
    for case, call, error_type, pattern in _disagreements(rank):
        try:
            call()
        except (TypeError, ValueError) as error:
            raised = (type(error).__name__, str(error))
        else:
            raised = None
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, raised)
        assert raised is not None, f"{case}: rank {rank} raised nothing"
        assert raised[0] == error_type.__name__, f"{case}: rank {rank} raised {raised}"
        assert re.search(pattern, raised[1]), f"{case}: rank {rank}'s message {raised[1]!r}"
        assert all(entry == raised for entry in everyone), f"{case}: the ranks raised {everyone}"


def _check_chunk_sizes_may_differ(rank):
    """Tokens per chunk only trade memory for speed: the ranks take the smallest (a rank's default one follows its
    shard's size, so unequal shards may choose different ones)."""
    t = _problem(torch.float64)
    head = _mine(t["head"], rank, dim=0)
    loss = vocab_parallel_linear_cross_entropy(t["hidden"], head, t["target"], chunk_size=[3, 4, 20][rank])
    expected = xent.cross_entropy(torch.nn.functional.linear(t["hidden"], t["head"]).flatten(0, 1),
                                  t["target"].flatten())  # fmt: skip
    torch.testing.assert_close(loss, expected)


def _check_unheld_targets_are_nan(rank):
    """Value checks off: a target in no shard (≥ V, or negative and not ignore_index) gives its row NaN, and its
    gradient NaN where the row's loss is used; the other rows keep their loss and gradient."""
    t = _problem(torch.float64)
    target = t["target"].clone()
    target.view(-1)[[1, 6, 13]] = torch.tensor([23, -5, 1000])
    unheld = torch.zeros(target.numel(), dtype=torch.bool)
    unheld[[1, 6, 13]] = True
    unheld = unheld.view(target.shape)
    sliced = torch.where(unheld, -100, target)  # the reference: those rows left out
    full = t["logits"].clone().requires_grad_()
    expected = xent.cross_entropy(full.flatten(0, 1), sliced.flatten(), reduction="none").view(target.shape)
    expected.sum().backward()
    hidden_full = t["hidden"].clone().requires_grad_()
    head_full = t["head"].clone().requires_grad_()
    linear_expected = xent.cross_entropy(torch.nn.functional.linear(hidden_full, head_full).flatten(0, 1),
                                         sliced.flatten(), reduction="none").view(target.shape)  # fmt: skip
    linear_expected.sum().backward()
    with xent.value_checks(False):
        shard = _mine(t["logits"], rank).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, target, reduction="none")
        assert loss[unheld].isnan().all(), loss
        torch.testing.assert_close(loss[~unheld], expected[~unheld])
        loss[~unheld].sum().backward()  # the NaN rows' loss unused: their gradient is 0, the others' the reference
        torch.testing.assert_close(shard.grad, _mine(full.grad, rank))
        assert vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1).isnan()  # the mean too
        shard.grad = None
        vocab_parallel_cross_entropy(shard, target, reduction="sum").backward()
        assert shard.grad.view(-1, SIZES[rank])[[1, 6, 13]].isnan().all()  # used: its gradient is NaN too

        hidden = t["hidden"].clone().requires_grad_()
        head = _mine(t["head"], rank, dim=0).clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(hidden, head, target, reduction="none", chunk_size=4)
        assert loss[unheld].isnan().all(), loss
        torch.testing.assert_close(loss[~unheld], linear_expected[~unheld])
        loss[~unheld].sum().backward()
        torch.testing.assert_close(hidden.grad, hidden_full.grad)
        torch.testing.assert_close(head.grad, _mine(head_full.grad, rank, dim=0))
        # a per-class option read at the target (LDAM's margin, focal's α) must not index out of range
        options = {"class_counts": COUNTS}
        ldam = vocab_parallel_loss(xent.ldam_loss, shard, target, reduction="none", **options)
        assert ldam[unheld].isnan().all() and ldam[~unheld].isfinite().all()


def _worker(rank, store_path, failures):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        _check_disagreements(rank)
        _check_chunk_sizes_may_differ(rank)
        _check_unheld_targets_are_nan(rank)
        # after every error, the group still works: no rank was left behind in a collective
        t = _problem()
        torch.testing.assert_close(
            vocab_parallel_cross_entropy(_mine(t["logits"], rank), t["target"]),
            xent.cross_entropy(t["logits"].flatten(0, 1), t["target"].flatten()),
        )
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def test_every_rank_raises_when_one_rank_is_bad_or_the_ranks_disagree(tmp_path):
    run_ranks(_worker, (str(tmp_path / "store"),), WORLD, deadline_s=DEADLINE_S)
