"""One implementation in its own process, so that its peak memory is its own (``xent bench`` on the CPU).

Protocol, one JSON object per line: the worker prepares and warms up, prints ``{"warmup_s": ...}``, then answers
each ``run`` read from stdin with ``{"time_s": ..., "peak_bytes": ...}`` until ``exit``.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

from xent.bench.cases import find_implementation
from xent.bench.problem import Prepared, Problem
from xent.kernels.buffers import cached_bytes

WARM_STEPS = 2
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark of resident memory (Linux ≥ 4.0)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def measure_once(prepared: Prepared) -> tuple[float, int | None]:
    """Time one step and return its peak resident memory above what was resident before it, counting the gradient
    buffer xent keeps between calls (:mod:`xent.kernels.buffers`) as the step's: it is resident before the step only
    because an earlier step left it."""
    prepared.reset()
    gc.collect()
    kept = cached_bytes()
    baseline = _status_bytes("VmRSS")
    can_reset = _reset_peak()
    start = time.perf_counter()
    prepared.step()
    elapsed = time.perf_counter() - start
    peak = _status_bytes("VmHWM") if can_reset else None
    return elapsed, None if peak is None or baseline is None else max(0, peak - baseline) + kept


def main() -> None:
    problem = Problem(**json.loads(sys.argv[1]))
    implementation = find_implementation(problem.operation, sys.argv[2])
    start = time.perf_counter()
    prepared = implementation.prepare(problem)
    prepared.reset()
    prepared.step()  # the first step compiles, where anything compiles
    warmup = time.perf_counter() - start
    for _ in range(WARM_STEPS):  # then a few more: the first large allocations of a process fault in slowly
        measure_once(prepared)
    print(json.dumps({"warmup_s": warmup}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        elapsed, peak = measure_once(prepared)
        print(json.dumps({"time_s": elapsed, "peak_bytes": peak}), flush=True)


if __name__ == "__main__":
    main()
