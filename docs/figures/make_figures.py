"""Regenerate the documentation's figures from xent's own commands: ``python docs/figures/make_figures.py``.

Each figure is what a user gets from one command — the bench's time and memory against the vocabulary size
(``xent bench --plot``), and two plots of ``xent compare``'s reports — copied here under a stable name. The site
shows the committed PNGs; this script is how they were made (about 10 minutes on 2 CPU cores; run it on an idle
machine, the bench's timings are medians of interleaved rounds). ``--only NAME`` remakes one figure.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# figure -> the bench command that draws it (with --plot FIGURE)
BENCH = {
    "bench-ce.png": "bench ce --n 4096 --v 4096,8192,16384,32768 --repeat 5",
    "bench-linear-ce.png": "bench linear-ce --n 4096 --d 512 --v 8192,16384,32768 --repeat 3",
}
# figure -> (the xent compare study, the plot of its study directory that is the figure)
COMPARE = {
    "long-tail-per-class.png": ("long-tail", "plots/per_class.png"),
    "calibration-reliability.png": ("calibration", "plots/reliability.png"),
}


def xent(*arguments: str) -> None:
    print("$ xent", " ".join(arguments), flush=True)
    subprocess.run([sys.executable, "-m", "xent", *arguments], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[*BENCH, *COMPARE], help="remake this figure only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for name, command in BENCH.items():
            if args.only in (None, name):
                xent(*command.split(), "--plot", str(HERE / name))
        for name, (study, plot) in COMPARE.items():
            if args.only in (None, name):
                out = Path(scratch) / study
                xent("compare", "--study", study, "--out", str(out))
                shutil.copyfile(out / plot, HERE / name)
                print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
