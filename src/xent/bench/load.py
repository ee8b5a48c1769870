"""The machine's load around a bench: spinning processes that make it busy on purpose (``xent bench --contend K``),
and the check that it was not busy already.

A spinner is a bare interpreter (``python -I -S``, no torch) running a pure-Python loop: it holds one core as long as
it runs, as another user's job would. It is a plain child process, not a multiprocessing one: forking this process
would copy torch's threads' state into it, and spawning one would import torch again. Three guards make sure none
outlives the bench: :func:`spinning` terminates and joins them when its block ends (normally, on an error, on Ctrl-C,
which reaches them too), their output goes nowhere (a Ctrl-C prints no traceback of theirs), and each one stops by
itself when its parent is gone (the bench killed with SIGKILL leaves nothing spinning).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Spin until the parent whose id is argv[1] is gone (the orphan is adopted by another process: getppid changes).
SPIN = """import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""
SPINNERS_PER_CORE = 4  # --contend allows up to this many spinners per core: more only queues them


def cores() -> int:
    """The cores this process may run on (its affinity, where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def max_spinners() -> int:
    return SPINNERS_PER_CORE * cores()


def check_spinners(count: int) -> None:
    """Refuse a number of spinners below 0 or above :func:`max_spinners`, naming ``--contend``."""
    if not 0 <= count <= max_spinners():
        raise ValueError(
            f"--contend must be between 0 and {max_spinners()} ({SPINNERS_PER_CORE} × the {cores()} cores here), "
            f"got {count}"
        )


@contextmanager
def spinning(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Run ``count`` spinning processes for the duration of the block; all are gone when it ends, however it ends."""
    check_spinners(count)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", SPIN, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# Other work worth at least this many cores beyond those torch leaves free makes the machine busy.
BUSY_CORES = 1.0


def busy_message(load: float, cores: int, threads: int) -> str | None:
    """The warning for a 1-minute load average of ``load`` on ``cores`` cores, before a bench whose torch runs
    ``threads`` threads, or None when other work leaves torch its cores."""
    competing = load - max(0, cores - threads)  # the other work that must share torch's cores
    if competing < BUSY_CORES:
        return None
    return (
        f"the machine is already busy: a load average of {load:.1f} over the last minute on {cores} cores, where "
        f"torch runs {threads} threads — times will be slower and noisier than on an idle machine; close other work "
        "and run again (--contend K measures a busy machine on purpose)"
    )


def busy_warning() -> str | None:
    """:func:`busy_message` for this machine now, or None where the platform has no load average."""
    import torch

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return busy_message(load, cores(), torch.get_num_threads())
