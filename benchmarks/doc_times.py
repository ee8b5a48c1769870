"""The wall times the README and the guides quote, measured again on this machine.

    python benchmarks/doc_times.py [--skip-studies] [--contend K]

Runs, each in a fresh process and a fresh directory: the default `xent train` (README's Quickstart), the GAN and VAE
examples (the loss-family guide), and the four default `xent compare` studies (choosing a loss). Prints one line per
command with its wall time, the machine (cores, CPU model) and the load average before it, so that a number copied
into the docs says where it came from. `--contend K` runs K spinning processes beside every command (`xent bench
--contend`'s), for the "with a core busy" figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xent.bench.load import spinning

ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commands(workdir: Path, studies: bool) -> list[tuple[str, list[str]]]:
    xent = [sys.executable, "-m", "xent"]
    runs = [
        ("xent train (README)", [*xent, "train", "--out", str(workdir / "train"), "--quiet"]),
        ("examples/gan.py", [sys.executable, str(ROOT / "examples" / "gan.py"), "--out", str(workdir / "gan.png")]),
        ("examples/vae.py", [sys.executable, str(ROOT / "examples" / "vae.py"), "--out", str(workdir / "vae.png")]),
    ]
    if studies:
        for study in ("long-tail", "noisy-labels", "calibration", "mse"):
            runs.append((f"xent compare --study {study}", [*xent, "compare", "--study", study,
                                                           "--out", str(workdir / study)]))  # fmt: skip
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-studies", action="store_true", help="leave out the four xent compare studies")
    parser.add_argument("--contend", type=int, default=0, metavar="K", help="spinning processes beside each command")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, {_cpu_model()}; Python {platform.python_version()}; "
          f"{args.contend} spinning process(es)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as directory, spinning(args.contend):
        for name, command in commands(Path(directory), not args.skip_studies):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            result = subprocess.run(command, cwd=directory, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            status = "" if result.returncode == 0 else f"  FAILED ({result.returncode}): {result.stderr[-300:]}"
            print(f"{name:36s} {seconds:7.1f} s   (load average before: {load:.2f}){status}", flush=True)


if __name__ == "__main__":
    main()
