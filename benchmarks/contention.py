"""xent's CPU kernels against PyTorch on a quiet and on a busy machine: spinning processes take cores on purpose.

    python benchmarks/contention.py [--spinners 0 2] [--repeat 7] [--sweep]

For each number of spinners (bare Python loops, `xent bench --contend`'s), interleaved forward + backward runs of:
- cross-entropy on 4096 × 16384 logits: `xent.cross_entropy` (automatic choice) against `F.cross_entropy`;
- the linear head N=2048, D=512, V=16384: `xent.linear_cross_entropy` against `F.linear` + `F.cross_entropy`, and the
  floor, the head's three GEMMs alone.
It prints medians, each as a multiple of PyTorch's median, and the slowest run of each. `--sweep` adds the crossover
of the automatic choice: for problems from 16k to 16M logits, the reference, the chunked kernel and PyTorch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import xent
from xent.bench.load import spinning


def _step(loss: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> float:
    """Seconds of forward + backward of ``loss(*leaves)``, the leaves copied from ``inputs`` before the clock starts."""
    leaves = [tensor.clone().requires_grad_() for tensor in inputs]
    start = time.perf_counter()
    loss(*leaves).backward()
    return time.perf_counter() - start


def _cross_entropy(n: int, v: int) -> dict[str, Callable[[], float]]:
    logits, target = torch.randn(n, v), torch.randint(v, (n,))
    return {
        "torch": lambda: _step(lambda x: F.cross_entropy(x, target), logits),
        "xent": lambda: _step(lambda x: xent.cross_entropy(x, target), logits),
        "xent reference": lambda: _step(lambda x: xent.cross_entropy(x, target, impl="reference"), logits),
        "xent chunked": lambda: _step(lambda x: xent.cross_entropy(x, target, impl="chunked"), logits),
    }


def _linear(n: int, d: int, v: int) -> dict[str, Callable[[], float]]:
    hidden, weight, target = torch.randn(n, d), torch.randn(v, d) * 0.05, torch.randint(v, (n,))

    def floor() -> float:
        start = time.perf_counter()
        logits = hidden @ weight.t()
        _ = logits @ weight, logits.t() @ hidden
        return time.perf_counter() - start

    return {
        "torch": lambda: _step(lambda h, w: F.cross_entropy(F.linear(h, w), target), hidden, weight),
        "xent": lambda: _step(lambda h, w: xent.linear_cross_entropy(h, w, target), hidden, weight),
        "floor (3 GEMMs)": floor,
    }


def measure(cases: dict[str, Callable[[], float]], repeat: int) -> dict[str, list[float]]:
    for run in cases.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, run in cases.items():
            times[name].append(run())
    return times


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.0f}" if seconds >= 0.01 else f"{1e3 * seconds:.3f}"


def report(title: str, times: dict[str, list[float]]) -> None:
    base = statistics.median(times["torch"])
    cells = [
        f"{name} {_ms(statistics.median(runs))} ms ({statistics.median(runs) / base:.2f}×, slowest {_ms(max(runs))})"
        for name, runs in times.items()
    ]
    print(f"  {title}: " + "; ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spinners", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"load average before: {os.getloadavg()[0]:.2f}")  # fmt: skip
    for count in args.spinners:
        with spinning(count):
            time.sleep(0.5)  # the spinners are running
            print(f"{count} spinning process(es):")
            ce = _cross_entropy(4096, 16384)
            report("cross_entropy 4096 × 16384", measure({k: ce[k] for k in ("torch", "xent")}, args.repeat))
            report("linear_cross_entropy N=2048 D=512 V=16384", measure(_linear(2048, 512, 16384), args.repeat))
            if args.sweep:
                for n, v in [(16, 1024), (64, 1024), (256, 1024), (512, 1024), (1024, 1024), (1024, 4096),
                             (4096, 4096)]:  # fmt: skip
                    repeat = args.repeat if n * v >= 1 << 20 else 5 * args.repeat  # microseconds: more runs
                    report(f"cross_entropy {n} × {v} ({n * v} logits)", measure(_cross_entropy(n, v), repeat))


if __name__ == "__main__":
    main()
