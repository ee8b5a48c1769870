"""A language model whose output head is split over the vocabulary across processes, trained on xent's
vocab-parallel loss — and the same training in one process, for comparison.

    torchrun --standalone --nproc-per-node 2 examples/vocab_parallel.py            # gloo on the CPU, ~20 s
    torchrun --standalone --nproc-per-node 2 examples/vocab_parallel.py --quick    # a few steps

Every rank holds the whole trunk (an embedding of the previous two tokens and an MLP, replicated as in tensor
parallelism) and its own rows of the head's weight: the vocabulary (default 10,007 tokens, split unevenly when the
ranks do not divide it) is never gathered, and neither are the logits. ``vocab_parallel_linear_cross_entropy``
gives every rank the loss of the whole vocabulary and the full gradient of the trunk's output, so the replicated
trunks stay identical. The data are sequences drawn from a random trigram model (seeded), the same on every rank.
At the end rank 0 trains the unsplit model in one process from the same initialisation and prints both loss curves
and their largest difference.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import xent
from xent.distributed import vocab_parallel_linear_cross_entropy

GROUPS = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=10007, help="vocabulary size (a prime: the shards differ)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=512, help="tokens per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps on a small vocabulary (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.steps, args.batch = 1009, 5, 128
    return args


class Trunk(nn.Module):
    """The two previous tokens → a hidden state: what every rank holds whole."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embedding(context).flatten(1))


def trigram_batches(vocab: int, batch: int, steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(context (batch, 2), next token (batch,))`` pairs: the last token's group (one of 64) has four likely
    successors (90 %; any token otherwise), and the token before it says which (a trigram model). Learnable in a few
    dozen steps, and the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(vocab, (GROUPS, 4), generator=generator)
    batches = []
    for _ in range(steps):
        context = torch.randint(vocab, (batch, 2), generator=generator)
        choice = context[:, 0] % 4
        noise = torch.randint(vocab, (batch,), generator=generator)
        likely = successors[context[:, 1] % GROUPS, choice]
        batches.append((context, torch.where(torch.rand(batch, generator=generator) < 0.9, likely, noise)))
    return batches


def initial_model(args: argparse.Namespace) -> tuple[Trunk, torch.Tensor]:
    """The trunk and the whole head's weight ``(V, hidden)``, from the seed: the same on every rank."""
    torch.manual_seed(args.seed)
    return Trunk(args.vocab, args.hidden), torch.randn(args.vocab, args.hidden) * args.hidden**-0.5


def train(trunk: Trunk, head: torch.Tensor, batches, lr: float, sharded: bool) -> list[float]:
    """Adam on the trunk and the head (the rank's rows of it when ``sharded``); the loss of each step."""
    head = head.clone().requires_grad_()
    optimizer = torch.optim.Adam([*trunk.parameters(), head], lr=lr)
    losses = []
    for context, target in batches:
        hidden = trunk(context)
        if sharded:
            loss = vocab_parallel_linear_cross_entropy(hidden, head, target, label_smoothing=0.1)
        else:
            loss = xent.linear_cross_entropy(hidden, head, target, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    trunk, head = initial_model(args)
    shard = head.tensor_split(world)[rank]  # this rank's rows of the head; the rest never reach it
    batches = trigram_batches(args.vocab, args.batch, args.steps, args.seed)
    start = time.perf_counter()
    losses = train(trunk, shard, batches, args.lr, sharded=True)
    elapsed = time.perf_counter() - start
    sizes = [len(rows) for rows in head.tensor_split(world)]
    if rank == 0:
        print(f"{world} ranks, vocabulary {args.vocab:,} split {sizes}: {args.steps} steps in {elapsed:.1f} s")
        single_trunk, single_head = initial_model(args)
        single = train(single_trunk, single_head, batches, args.lr, sharded=False)
        for step in range(0, args.steps, max(1, args.steps // 10)):
            print(f"step {step + 1:4d}  vocab-parallel {losses[step]:.6f}  one process {single[step]:.6f}")
        difference = max(abs(a - b) for a, b in zip(losses, single, strict=True))
        print(f"final loss {losses[-1]:.6f} (one process {single[-1]:.6f}); largest difference {difference:.2e}")
    # The ranks tear the group down together: a gloo rank that destroys it while its peer is still connected (here,
    # while rank 0 trains the one-process model) can abort in gloo's teardown ("terminate called without an active
    # exception"), seen once in CI.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
