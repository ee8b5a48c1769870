"""The fused family against plain fused cross-entropy, on one linear head: does a family loss cost more?

    python benchmarks/fused_family.py [--n 4096] [--d 1024] [--v 32768] [--rounds 3]

Each round runs `xent bench`'s harness (a worker process per implementation: warm-up, timed steps, peak memory
above the inputs) on the same head for `linear_cross_entropy`, `linear_loss(focal_loss)`,
`linear_loss(logit_adjusted_cross_entropy)` and `linear_distillation_loss` (a teacher head of the same shape), in
turn, so that the machine's drift hits them alike; medians over rounds are compared with linear cross-entropy's.
Targets (issue: every loss of the family through the kernels): focal and logit-adjusted ≤ 1.1× its time,
distillation ≤ 2.2×, each ≤ 256 MB above d(input) + d(weight).
"""

from __future__ import annotations

import argparse
import statistics

from xent.bench import Problem, run_bench

CASES = {
    "linear_cross_entropy": ("linear-ce", "cross_entropy"),
    "linear_loss(focal_loss)": ("linear-ce", "focal_loss"),
    "linear_loss(logit_adjusted_cross_entropy)": ("linear-ce", "logit_adjusted_cross_entropy"),
    "linear_distillation_loss": ("linear-distill", "cross_entropy"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    over: dict[str, list[float]] = {name: [] for name in CASES}
    for round_index in range(args.rounds):
        for name, (operation, loss) in CASES.items():
            problem = Problem(operation, args.n, args.d, args.v, loss=loss)
            (measurement,) = run_bench(problem, ["xent"], repeat=3)
            times[name].append(measurement.time_s)
            over[name].append((measurement.peak - problem.floor_bytes()) / 2**20)
            print(f"round {round_index + 1}: {name:44s} {measurement.time_s:7.2f} s  "
                  f"{over[name][-1]:6.0f} MB over d(input) + d(weight)", flush=True)  # fmt: skip
    base = statistics.median(times["linear_cross_entropy"])
    print(f"\nN={args.n}, D={args.d}, V={args.v}, float32, cpu; medians of {args.rounds} rounds")
    for name in CASES:
        median = statistics.median(times[name])
        print(f"{name:44s} {median:7.2f} s  {median / base:5.2f}× linear_cross_entropy  "
              f"{statistics.median(over[name]):6.0f} MB over d(input) + d(weight)")  # fmt: skip


if __name__ == "__main__":
    main()
