"""The fused policy head beside linear cross-entropy and TRL's chunked log-prob kernel (issue 28's targets).

    python benchmarks/policy_head.py                    # N = 8 × 512 tokens, D = 1024, V = 32768, float32, CPU
    python benchmarks/policy_head.py --n 1024 --repeat 3

Each implementation runs forward + backward in its own process (so that its peak memory is its own), after two
warm-up steps; the table gives medians over ``--repeat`` steps, rounds interleaved across the processes, and the
peak resident memory above the inputs (of which d(hidden) + d(weight) are the gradients any implementation returns):

- ``xent.linear_policy_loss``: GRPO's loss (old log-probs given, ``entropy_coef=1e-3``) from the hidden states;
- ``xent.linear_log_probs``: log-probs and entropy, both differentiated;
- ``trl ChunkedLogProbFunction``: TRL 1.16's fused head, log-probs and entropy, both differentiated;
- ``xent.linear_cross_entropy``: the baseline.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _rounds import interleaved_rounds, serve  # benchmarks/, the script's folder

import xent
from xent.bench.problem import Prepared
from xent.bench.worker import measure_once

NAMES = ("linear_policy_loss", "linear_log_probs", "trl_log_probs", "linear_cross_entropy")


def prepare(name: str, n: int, d: int, v: int) -> Prepared:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, n // 8, d, generator=generator).requires_grad_()
    weight = (torch.randn(v, d, generator=generator) * 0.02).requires_grad_()
    tokens = torch.randint(v, (8, n // 8), generator=generator)
    mask = torch.ones(8, n // 8)
    advantages = torch.randn(8, generator=generator)
    old = torch.full((8, n // 8), -10.4)

    def step() -> None:
        if name == "linear_policy_loss":
            out = xent.linear_policy_loss(hidden, weight, tokens, advantages, mask, old_log_probs=old,
                                          entropy_coef=1e-3)  # fmt: skip
            out.loss.backward()
        elif name == "linear_log_probs":
            log_probs, entropy = xent.linear_log_probs(hidden, weight, tokens)
            (log_probs.sum() + entropy.sum()).backward()
        elif name == "trl_log_probs":
            from trl.kernels import ChunkedLogProbFunction

            log_probs, entropy, *_ = ChunkedLogProbFunction.apply(
                hidden.reshape(-1, d), weight, None, tokens.reshape(-1), 1.0, 32768, None, 1.0, ("entropy",)
            )
            (log_probs.sum() + entropy.sum()).backward()
        else:
            xent.linear_cross_entropy(hidden, weight, tokens).backward()

    def reset() -> None:
        hidden.grad = weight.grad = None

    return Prepared(step, reset)


def worker(name: str, n: int, d: int, v: int) -> None:
    prepared = prepare(name, n, d, v)
    for _ in range(3):  # the first step, then two to fault the large allocations in
        measure_once(prepared)
    serve(prepared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--worker", choices=NAMES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.n, args.d, args.v)
        return
    sizes = ["--n", str(args.n), "--d", str(args.d), "--v", str(args.v)]
    runs, _ = interleaved_rounds(__file__, list(NAMES), sizes, args.repeat)
    gradients = (args.n * args.d + args.v * args.d) * 4 / 2**20
    baseline = statistics.median(r["time_s"] for r in runs["linear_cross_entropy"])
    print(f"N={args.n} D={args.d} V={args.v} float32, medians of {args.repeat}; gradients {gradients:.0f} MB")
    print(f"{'implementation':<24} {'median s':>9} {'× linear CE':>12} {'peak MB':>8} {'MB over grad':>13}")
    for name, measured in runs.items():
        time_s = statistics.median(r["time_s"] for r in measured)
        peak = statistics.median(r["peak_bytes"] for r in measured) / 2**20
        print(f"{name:<24} {time_s:>9.2f} {time_s / baseline:>12.2f} {peak:>8.0f} {peak - gradients:>13.0f}")


if __name__ == "__main__":
    main()
