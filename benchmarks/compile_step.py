"""xent.cross_entropy compiled against eager, in one process, step after step in turn.

    python benchmarks/compile_step.py                      # 4096 × 16384 logits, 15 steps each
    python benchmarks/compile_step.py --n 8192 --v 32000 --repeat 21

``xent bench ce --impl xent,xent-compile`` runs each implementation in a process of its own (so that each peak is
its own); on a VM whose speed drifts, two processes can land on different luck. Here one process holds both — the
same logits, the same allocator, the steps alternating — so the ratio of the medians is the compiled call's own
cost: a forward and backward (``loss.backward()``) of ``torch.compile(xent.cross_entropy, fullgraph=True)`` against
``xent.cross_entropy``, after one untimed compiling step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import xent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096, help="rows")
    parser.add_argument("--v", type=int, default=16384, help="classes")
    parser.add_argument("--repeat", type=int, default=15, help="timed steps of each")
    args = parser.parse_args()
    logits = torch.randn(args.n, args.v, requires_grad=True)
    target = torch.randint(0, args.v, (args.n,))
    steps = {"eager": xent.cross_entropy, "compiled": torch.compile(xent.cross_entropy, fullgraph=True)}
    for step in steps.values():  # the compiling step, and a warm one for eager
        step(logits, target).backward()
        logits.grad = None
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeat):
        for name, step in steps.items():
            start = time.perf_counter()
            step(logits, target).backward()
            times[name].append(time.perf_counter() - start)
            logits.grad = None
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(f"xent.cross_entropy, {args.n} × {args.v} float32 logits, forward + backward, {args.repeat} steps each")
    for name, values in times.items():
        runs = " ".join(f"{value * 1e3:.0f}" for value in values)
        print(f"{name:<9} median {medians[name]:7.1f} ms   runs {runs}")
    print(f"compiled / eager: {medians['compiled'] / medians['eager']:.3f}")


if __name__ == "__main__":
    main()
