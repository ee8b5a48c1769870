"""Vocab-parallel log-probabilities and token statistics on real processes (gloo): every rank's outputs and
gradients (d(input) whole, d(weight) and d(bias) its rows) equal the materialised logits' — log_softmax of the full
head, written here — for every output, head transform, dtype and chunking."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

from tests.distributed.spawn import run_ranks
from tests.kernels.test_logprobs import HEADS, reference_logits
from xent.distributed import vocab_parallel_linear_log_probs, vocab_parallel_linear_token_outputs

SHARDS = {2: [9, 14], 3: [5, 11, 7]}  # unequal slices of V = 23
VOCAB, D, IGNORE = 23, 6, -100
STATISTICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (3e-2, 3e-2)}


def _problem(dtype, seed=0, shape=(3, 7)):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=generator, dtype=torch.float64).to(dtype)
    w = torch.randn(VOCAB, D, generator=generator, dtype=torch.float64).to(dtype)
    b = torch.randn(VOCAB, generator=generator, dtype=torch.float64).to(dtype)
    target = torch.randint(VOCAB, shape, generator=generator)
    target.view(-1)[::4] = IGNORE
    grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2)]
    return x, w, b, target, grads


def _reference(x, w, b, target, head):
    """Every output on the materialised logits, and the gradients of ``Σ g₀ log p_y + Σ g₁ H``."""
    logits = reference_logits(x, w, b, **head)
    log_p = torch.log_softmax(logits, -1)
    valid = target != IGNORE
    picked = log_p.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    return {
        "log_probs": torch.where(valid, picked, torch.zeros_like(picked)),
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * log_p, -1),
        "mean_logits": logits.mean(-1),
        "is_top1": (logits.argmax(-1) == target) & valid,
    }


def _check_against_reference(rank, sizes):
    offset = sum(sizes[:rank])
    rows = slice(offset, offset + sizes[rank])
    for dtype in TOLERANCE:
        rtol, atol = TOLERANCE[dtype]
        for head_name, head in HEADS.items():
            for bias in (False, True):
                x, w, b, target, grads = _problem(dtype)
                b = b if bias else None
                leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
                expected = _reference(*leaves[:2], leaves[2] if bias else None, target, head)
                used = expected["log_probs"] * grads[0].to(expected["log_probs"].dtype)
                used = used + expected["entropy"] * grads[1].to(used.dtype)
                expected_grads = torch.autograd.grad(used.sum(), leaves)

                shard = [x.clone().requires_grad_(), w[rows].clone().requires_grad_()]
                if bias:
                    shard.append(b[rows].clone().requires_grad_())
                got = vocab_parallel_linear_token_outputs(
                    shard[0], shard[1], target, linear_bias_shard=shard[2] if bias else None, **head,
                    chunk_size=5, outputs=("log_probs", *STATISTICS),
                )  # fmt: skip
                message = f"rank {rank} {dtype} {head_name} bias={bias}"
                for name, value in expected.items():
                    if name == "is_top1":
                        if dtype != torch.bfloat16:  # near-ties in bfloat16 may differ with the summation order
                            assert torch.equal(got.is_top1, value), message
                        continue
                    torch.testing.assert_close(getattr(got, name).double(), value.detach().double(), rtol=rtol,
                                               atol=atol, msg=f"{message} {name}")  # fmt: skip
                used = got.log_probs * grads[0].to(got.log_probs.dtype) + got.entropy * grads[1].to(got.log_probs.dtype)
                got_grads = torch.autograd.grad(used.sum(), shard)
                sliced = [expected_grads[0], expected_grads[1][rows]] + ([expected_grads[2][rows]] if bias else [])
                for index, (value, want) in enumerate(zip(got_grads, sliced, strict=True)):
                    assert value.dtype == want.dtype, message
                    torch.testing.assert_close(value.double(), want.double(), rtol=10 * rtol, atol=10 * atol,
                                               msg=f"{message} grad {index}")  # fmt: skip


def _check_outputs_and_edges(rank, sizes, world):
    offset = sum(sizes[:rank])
    rows = slice(offset, offset + sizes[rank])
    x, w, _, target, _ = _problem(torch.float64)
    # the pair function, and only the outputs asked for
    log_probs, entropy = vocab_parallel_linear_log_probs(x, w[rows], target, temperature=0.7)
    expected = _reference(x, w, None, target, {"temperature": 0.7})
    torch.testing.assert_close(log_probs, expected["log_probs"])
    torch.testing.assert_close(entropy, expected["entropy"])
    only = vocab_parallel_linear_token_outputs(x, w[rows], target, outputs=("mean_logits",))
    assert only.entropy is None and only.is_top1 is None and only.log_sum_sq_probs is None
    torch.testing.assert_close(only.mean_logits, _reference(x, w, None, target, {})["mean_logits"])
    # ties for the largest logit across two ranks: the first class is the top-1, as argmax takes it
    tied = torch.zeros(2, VOCAB, dtype=torch.float64)
    tied[:, [1, VOCAB - 1]] = 5.0  # on the first rank and on the last
    eye = torch.eye(VOCAB, dtype=torch.float64)
    top1 = vocab_parallel_linear_token_outputs(tied, eye[rows], torch.tensor([1, VOCAB - 1]), outputs=("is_top1",))
    assert top1.is_top1.tolist() == [True, False]
    # gradient accumulation through log-probs only (no entropy computed), and an empty batch
    x_leaf = x.clone().requires_grad_()
    alone = vocab_parallel_linear_token_outputs(x_leaf, w[rows], target, outputs=("log_probs",))
    (grad,) = torch.autograd.grad(alone.log_probs.sum(), x_leaf)
    x_ref = x.clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(_reference(x_ref, w, None, target, {})["log_probs"].sum(), x_ref)
    torch.testing.assert_close(grad, expected_grad)
    empty = vocab_parallel_linear_token_outputs(x[:0], w[rows], target[:0])
    assert empty.log_probs.shape == (0, 7)
    # errors: raised on every rank alike, also when only one rank's argument is bad
    with pytest.raises(ValueError, match="outputs has 'entropies'"):
        vocab_parallel_linear_token_outputs(x, w[rows], target, outputs=("entropies",))
    bad_temperature = 0.0 if rank == world - 1 else 1.0
    with pytest.raises(ValueError, match="temperature must be in"):
        vocab_parallel_linear_token_outputs(x, w[rows], target, temperature=bad_temperature)
    with pytest.raises(ValueError, match="temperature"):  # the ranks disagree on it
        vocab_parallel_linear_token_outputs(x, w[rows], target, temperature=1.0 + rank)
    with pytest.raises(ValueError, match=r"target holds class index 23"):
        vocab_parallel_linear_token_outputs(x, w[rows], torch.full((3, 7), VOCAB))


def _worker(rank, world, store_path, failures):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        sizes = SHARDS[world]
        if world == 2:
            _check_against_reference(rank, sizes)
        _check_outputs_and_edges(rank, sizes, world)
        dist.barrier()  # no rank leaves while another is still in a collective (gloo aborts the latter otherwise)
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_full_outputs_and_its_slice_of_the_gradients(world, tmp_path):
    run_ranks(_worker, (world, str(tmp_path / "store")), world)
