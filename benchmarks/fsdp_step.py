"""A training step of a small Llama sharded with FSDP2 on 2 CPU processes (gloo), unpatched and patched by xent.hf.

    python benchmarks/fsdp_step.py                      # D = 256, 2 layers, V = 32,768; 4 × 512 tokens per rank
    python benchmarks/fsdp_step.py --repeat 5 --tokens 1024

Each variant runs in its own pair of processes (so that each rank's peak is its own): the model built from one seed,
each decoder layer and the root sharded with ``fully_shard``, one warm-up step, then ``--repeat`` steps of forward
(with labels) and backward; the table gives the median step time and the median per-rank peak resident memory
above what was resident before the step, and the logits' bytes (float32, ``B × T × V``) for scale. The issue's
targets: the patched peak at most the unpatched one minus 70 % of the logits, the time at most 1.1×.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from xent.bench.problem import Prepared
from xent.bench.worker import measure_once

WORLD = 2


def worker(rank: int, variant: str, args: argparse.Namespace, port: int, out: str) -> None:
    import transformers
    from torch.distributed.fsdp import fully_shard

    import xent.hf

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.tokens,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    if variant == "xent":
        xent.hf.patch(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(args.vocab, (args.batch, args.tokens), generator=generator)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    def reset() -> None:
        model.zero_grad(set_to_none=True)

    prepared = Prepared(step, reset)
    measure_once(prepared)  # warm-up: the first large allocations fault in
    runs = [measure_once(prepared) for _ in range(args.repeat)]
    torch.save(runs, Path(out) / f"{variant}-{rank}.pt")
    dist.barrier()
    model = None  # FSDP's state goes before the group does
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    summary = {}
    with tempfile.TemporaryDirectory(prefix="xent-fsdp-step-") as out:
        for variant in ("unpatched", "xent"):
            torch.multiprocessing.spawn(worker, args=(variant, args, free_port(), out), nprocs=WORLD)
            runs = [run for rank in range(WORLD) for run in torch.load(Path(out) / f"{variant}-{rank}.pt")]
            summary[variant] = (
                statistics.median(time for time, _ in runs),
                statistics.median(peak for _, peak in runs if peak is not None) / 2**20,
            )
    logits_mb = args.batch * args.tokens * args.vocab * 4 / 2**20
    print(
        f"FSDP2, {WORLD} gloo ranks, Llama D={args.hidden} 2 layers V={args.vocab}, {args.batch} × {args.tokens} "
        f"tokens per rank, float32; medians of {args.repeat} steps × {WORLD} ranks; logits {logits_mb:.0f} MB"
    )
    base_time, base_peak = summary["unpatched"]
    print(f"{'variant':<10} {'step s':>7} {'× unpatched':>12} {'peak MB/rank':>13} {'saved / logits':>15}")
    for variant, (time_s, peak) in summary.items():
        print(f"{variant:<10} {time_s:>7.2f} {time_s / base_time:>12.2f} {peak:>13.0f} "
              f"{(base_peak - peak) / logits_mb:>15.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
