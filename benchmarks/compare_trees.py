"""The CPU kernels of this tree against another source tree, side by side: is a change free of slowdowns?

    git worktree add /tmp/before HEAD~1                        # or: git archive REV src | tar -x -C /tmp/before
    python benchmarks/compare_trees.py --src /tmp/before/src [--rounds 5]

Each round runs, for each tree in turn, a fresh process (its own PYTHONPATH) that times forward + backward of
`xent.cross_entropy` on 4096 × 16384 logits and `xent.linear_cross_entropy` with N=2048, D=512, V=16384 (weights of
std 0.05, as a trained head's; unscaled random weights give logits of std 22 whose softmax underflows to subnormal
floats, 30× slower in any implementation), five times after a warm-up, and reports its median. Rounds interleave the
trees, so a busy machine slows both alike; the medians over rounds and their ratio are printed with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ONE_TREE = """
import json, statistics, time, torch, xent
torch.manual_seed(0)
logits = torch.randn(4096, 16384, requires_grad=True)
target = torch.randint(16384, (4096,))
hidden = torch.randn(2048, 512, requires_grad=True)
head = (torch.randn(16384, 512) * 0.05).requires_grad_()
tokens = torch.randint(16384, (2048,))
cases = {
    "cross_entropy 4096 x 16384": (lambda: xent.cross_entropy(logits, target).backward(), [logits]),
    "linear_cross_entropy N=2048 D=512 V=16384": (
        lambda: xent.linear_cross_entropy(hidden, head, tokens).backward(), [hidden, head]),
}
medians = {}
for name, (step, leaves) in cases.items():
    times = []
    for _ in range(6):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    medians[name] = statistics.median(times[1:])
print(json.dumps(medians))
"""


def _run(src: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", ONE_TREE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="the other tree's src/ folder (the one measured against)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trees = {"other": args.src, "this": str(Path(__file__).resolve().parent.parent / "src")}
    results: dict[str, dict[str, list[float]]] = {tree: {} for tree in trees}
    started = time.perf_counter()
    for _ in range(args.rounds):
        for tree, src in trees.items():
            for case, seconds in _run(src).items():
                results[tree].setdefault(case, []).append(seconds)
    print(f"torch threads as set by each process; load average {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} rounds in {time.perf_counter() - started:.0f} s")  # fmt: skip
    for case in results["this"]:
        other, this = (statistics.median(results[tree][case]) * 1e3 for tree in ("other", "this"))
        print(f"  {case}: other {other:.1f} ms, this {this:.1f} ms, this/other {this / other:.3f}")


if __name__ == "__main__":
    main()
