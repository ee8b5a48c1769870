"""Vocab-parallel linear cross-entropy on CPU processes against single-process ``xent.linear_cross_entropy``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/vocab_parallel.py
    torchrun --standalone --nproc-per-node 2 benchmarks/vocab_parallel.py --tokens 1024 --vocab 8192

Each rank holds the rows ``tensor_split`` gives it of a ``(V, D)`` head and the whole ``(N, D)`` input; one step is
forward + backward. Reported per rank: the median step time, the peak resident memory above what was resident
before the step (``xent bench``'s measure), and the elements the rank sent through collectives. Then rank 0 runs the
same step in one process on the whole head with every core, while the other ranks wait.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

import xent
from xent.bench.problem import Prepared
from xent.bench.worker import measure_once
from xent.distributed import vocab_parallel_linear_cross_entropy


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # (not --n/--v/--d: torchrun would take them for abbreviations of its own options)
    parser.add_argument("--tokens", type=int, default=4096, help="N")
    parser.add_argument("--vocab", type=int, default=32768, help="V")
    parser.add_argument("--hidden", type=int, default=1024, help="D")
    parser.add_argument("--repeat", type=int, default=5)
    return parser.parse_args()


def counting_collectives() -> list[int]:
    """Wrap all_reduce and all_gather so that they add the elements this rank sends to the returned counter."""
    sent = [0]
    all_reduce, all_gather = dist.all_reduce, dist.all_gather

    def counted_all_reduce(tensor, *args, **kwargs):
        sent[0] += tensor.numel()
        return all_reduce(tensor, *args, **kwargs)

    def counted_all_gather(outputs, tensor, *args, **kwargs):
        sent[0] += tensor.numel()
        return all_gather(outputs, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = counted_all_reduce, counted_all_gather
    return sent


def measure(step, leaves, repeat: int) -> tuple[float, int]:
    """(median seconds, largest peak bytes) of ``step`` over ``repeat`` runs after one warm-up."""

    def reset() -> None:
        for leaf in leaves:
            leaf.grad = None

    prepared = Prepared(step, reset)
    measure_once(prepared)
    runs = [measure_once(prepared) for _ in range(repeat)]
    return statistics.median(seconds for seconds, _ in runs), max(peak or 0 for _, peak in runs)


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world))
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden, generator=generator) * 0.1).requires_grad_()
    head = torch.randn(args.vocab, args.hidden, generator=generator) * args.hidden**-0.5
    target = torch.randint(args.vocab, (args.tokens,), generator=generator)
    shard = head.tensor_split(world)[rank].clone().requires_grad_()
    sent = counting_collectives()

    def sharded_step() -> None:
        vocab_parallel_linear_cross_entropy(hidden, shard, target).backward()

    seconds, peak = measure(sharded_step, [hidden, shard], args.repeat)
    per_step = sent[0] // (args.repeat + 1)
    results = [None] * world
    dist.all_gather_object(results, (rank, len(shard), seconds, peak, per_step))
    if rank == 0:
        torch.set_num_threads(cores)
        whole = head.clone().requires_grad_()
        single_seconds, single_peak = measure(
            lambda: xent.linear_cross_entropy(hidden, whole, target).backward(), [hidden, whole], args.repeat
        )
        logits_mb = args.tokens * args.vocab * 4 / 2**20
        threads = max(1, cores // world)
        print(f"N={args.tokens}, V={args.vocab}, D={args.hidden}, float32; {world} gloo processes × {threads} threads "
              f"against 1 process × {cores} (the full logits would be {logits_mb:.0f} MB)")  # fmt: skip
        print("| | V_r | median step | peak above inputs | elements sent per step |")
        print("|---|---|---|---|---|")
        for rank_, size, seconds_, peak_, elements in results:
            print(f"| rank {rank_} | {size:,} | {seconds_ * 1e3:.0f} ms | {peak_ / 2**20:.0f} MB | {elements:,} |")
        print(f"| one process | {args.vocab:,} | {single_seconds * 1e3:.0f} ms | {single_peak / 2**20:.0f} MB | — |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
