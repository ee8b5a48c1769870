"""Start-up: the wall time of `xent train` above its training, and the wall time of a `xent compare` study.

    python benchmarks/startup.py [--rounds 5] [--src OTHER/src ...] [--study long-tail]

Each round runs `python -m xent train --epochs 1` (digits, the defaults) in a fresh process and subtracts the
training seconds its summary.json reports: what is left is start-up (imports, data, model) and the end (test
evaluation, checkpoints, plots). With --src the same is measured for other source trees (e.g. one extracted with
`git archive HEAD src | tar -x -C /tmp/before`), rounds interleaved so that a busy machine slows both alike. With
--study the default study is also run once per tree (`xent compare --study NAME`, a new directory each). The load
average is printed with each result: on a shared machine every number is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(command: list[str], src: str | None) -> float:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def train_overhead(src: str | None, scratch: Path, index: int) -> tuple[float, float]:
    """(wall seconds, training seconds) of one `xent train --epochs 1`."""
    out = scratch / f"train-{index}"
    wall = _run([sys.executable, "-m", "xent", "train", "--epochs", "1", "--out", str(out)], src)
    return wall, json.loads((out / "summary.json").read_text())["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--src", action="append", default=[], help="another source tree to measure beside this one")
    parser.add_argument("--study", help="also time `xent compare --study STUDY` once per tree")
    parser.add_argument("--jobs", type=int, help="--jobs for the study (default: xent compare's)")
    args = parser.parse_args()
    trees: list[str | None] = [None, *args.src]
    names = ["this tree", *args.src]
    with tempfile.TemporaryDirectory(prefix="xent-startup-") as scratch:
        overheads: dict[int, list[float]] = {i: [] for i in range(len(trees))}
        for round_index in range(args.rounds):
            for i, src in enumerate(trees):
                wall, trained = train_overhead(src, Path(scratch) / str(i), round_index)
                overheads[i].append(wall - trained)
        load = os.getloadavg()[0]
        for i, name in enumerate(names):
            values = overheads[i]
            print(f"xent train --epochs 1, wall − training ({name}): median {statistics.median(values):.2f} s, "
                  f"min {min(values):.2f} s over {args.rounds} rounds (load average {load:.2f})")  # fmt: skip
        if args.study:
            for i, (src, name) in enumerate(zip(trees, names, strict=True)):
                command = [sys.executable, "-m", "xent", "compare", "--study", args.study,
                           "--out", str(Path(scratch) / f"study-{i}")]  # fmt: skip
                if args.jobs:
                    command += ["--jobs", str(args.jobs)]
                before = os.getloadavg()[0]
                wall = _run(command, src)
                rows = (Path(scratch) / f"study-{i}" / "results.csv").read_text().splitlines()[1:]
                print(f"xent compare --study {args.study} ({name}): {wall:.1f} s wall for {len(rows)} cells "
                      f"(load average {before:.2f} before, {os.getloadavg()[0]:.2f} after)")  # fmt: skip


if __name__ == "__main__":
    main()
