"""Run implementations side by side: warm-up apart, then interleaved rounds, medians of each.

On the CPU each implementation lives in its own worker process (:mod:`xent.bench.worker`), so peak memory is its
own resident high-water mark; rounds visit the workers in turn, so slow drifts of the machine hit all of them alike.
On CUDA everything runs in this process, timed with CUDA events, memory by ``torch.cuda.max_memory_allocated``.
With ``contend=K``, K spinning processes (:mod:`xent.bench.load`) run from the first warm-up to the last round.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, cast

import torch

from xent.bench.cases import IMPLEMENTATIONS
from xent.bench.load import spinning
from xent.bench.problem import FAILED, Implementation, Prepared, Problem, Unavailable

# Idle workers' OpenMP threads spin for a while after their last parallel region; a pause before each step keeps
# them from competing with the worker being measured.
SETTLE_SECONDS = 0.3


@dataclass
class Measurement:
    """One implementation's runs on one problem: ``skipped`` says why it did not run (then it has no times),
    ``spinning`` how many spinning processes ran beside it (``contend``), ``is_baseline`` that it is the yardstick of
    the problem's "× baseline" column rather than an implementation."""

    problem: Problem
    name: str
    is_floor: bool
    warmup_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    skipped: Unavailable | None = None
    spinning: int = 0
    is_baseline: bool = False

    @property
    def time_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def peak(self) -> int | None:
        return int(statistics.median(self.peak_bytes)) if self.peak_bytes else None


class _Worker:
    def __init__(self, problem: Problem, name: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "xent.bench.worker", json.dumps(dataclasses.asdict(problem)), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # the three pipes, typed once (Popen types each as IO[str] | None)
        self.stdin, self.stdout, self.stderr = (
            cast(IO[str], pipe) for pipe in (self.process.stdin, self.process.stdout, self.process.stderr)
        )

    def read(self) -> dict[str, Any]:
        line = self.stdout.readline()
        if not line:
            error = self.stderr.read().strip().splitlines()
            raise RuntimeError(error[-1] if error else "the worker exited without an answer")
        return cast(dict[str, Any], json.loads(line))

    def run(self) -> dict[str, Any]:
        self.stdin.write("run\n")
        self.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.stdin.write("exit\n")
            self.stdin.close()
            self.process.wait(timeout=60)


def _select(problem: Problem, names: Sequence[str] | None) -> list[Implementation]:
    available = IMPLEMENTATIONS[problem.operation]
    if not names:
        return list(available)
    known = {implementation.name: implementation for implementation in available}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--impl {','.join(unknown)} unknown for {problem.operation}; choose from {', '.join(known)}")
    return [known[name] for name in names]


def run_bench(
    problem: Problem,
    names: Sequence[str] | None = None,
    *,
    repeat: int = 3,
    contend: int = 0,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Measurement]:
    """Measure the chosen implementations (all by default) of ``problem``; ``repeat`` interleaved rounds, with
    ``contend`` spinning processes beside them (a busy machine on purpose; stopped before this returns or raises)."""
    implementations = _select(problem, names)
    measurements = [
        Measurement(problem, impl.name, impl.is_floor, spinning=contend, is_baseline=impl.is_baseline)
        for impl in implementations
    ]
    runnable = []
    for implementation, measurement in zip(implementations, measurements, strict=True):
        measurement.skipped = implementation.needs(problem)
        if measurement.skipped is None:
            runnable.append((implementation, measurement))
    with spinning(contend):
        if contend:
            progress(f"{contend} spinning process{'es' if contend > 1 else ''} started")
        if problem.device == "cuda":
            _run_cuda(problem, runnable, repeat, progress)
        else:
            _run_cpu(problem, runnable, repeat, progress)
    return measurements


def _run_cpu(
    problem: Problem,
    runnable: list[tuple[Implementation, Measurement]],
    repeat: int,
    progress: Callable[[str], None],
) -> None:
    workers: dict[str, _Worker] = {}
    try:
        for implementation, measurement in runnable:
            progress(f"warming up {implementation.name}")
            worker = _Worker(problem, implementation.name)
            try:
                measurement.warmup_s = worker.read()["warmup_s"]
                workers[implementation.name] = worker
            except RuntimeError as error:
                measurement.skipped = Unavailable(FAILED, str(error))
                worker.process.kill()
        for round_index in range(repeat):
            for implementation, measurement in runnable:
                if implementation.name not in workers:
                    continue
                progress(f"round {round_index + 1}/{repeat}: {implementation.name}")
                time.sleep(SETTLE_SECONDS)
                result = workers[implementation.name].run()
                measurement.times_s.append(result["time_s"])
                if result["peak_bytes"] is not None:
                    measurement.peak_bytes.append(result["peak_bytes"])
    finally:
        for worker in workers.values():
            worker.close()


def _run_cuda(
    problem: Problem,
    runnable: list[tuple[Implementation, Measurement]],
    repeat: int,
    progress: Callable[[str], None],
) -> None:
    prepared: dict[str, Prepared] = {}
    ready: Prepared | None
    for implementation, measurement in runnable:
        progress(f"warming up {implementation.name}")
        try:
            start = time.perf_counter()
            ready = implementation.prepare(problem)
            ready.reset()
            ready.step()
            torch.cuda.synchronize()
            measurement.warmup_s = time.perf_counter() - start
            prepared[implementation.name] = ready
        except Exception as error:  # a third-party kernel that does not run here is reported, not fatal
            measurement.skipped = Unavailable(FAILED, f"{type(error).__name__}: {error}")
    for round_index in range(repeat):
        for implementation, measurement in runnable:
            ready = prepared.get(implementation.name)
            if ready is None:
                continue
            progress(f"round {round_index + 1}/{repeat}: {implementation.name}")
            ready.reset()
            torch.cuda.synchronize()
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
            ready.step()
            end_event.record()
            torch.cuda.synchronize()
            measurement.times_s.append(start_event.elapsed_time(end_event) / 1e3)
            measurement.peak_bytes.append(torch.cuda.max_memory_allocated() - baseline)
