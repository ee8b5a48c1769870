"""Interleaved rounds of benchmark workers, one process per implementation (so that each peak is its own).

A script runs :func:`serve` in its worker processes and :func:`interleaved_rounds` in the parent: each worker
prepares its step, answers ``{"ready": true, …}`` (or ``{"error": …}``), then measures one step per ``run`` line of
its standard input and answers one JSON line per step, until ``exit``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from xent.bench.problem import Prepared
from xent.bench.worker import measure_once


def serve(prepared: Prepared, ready: dict[str, Any] | None = None, extra: Callable[[], dict] = dict) -> None:
    """The worker's side: announce ``ready`` (merged into ``{"ready": true}``), then one measured step per ``run``,
    answered with its time, its peak and ``extra()``."""
    print(json.dumps({"ready": True, **(ready or {})}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        elapsed, peak = measure_once(prepared)
        print(json.dumps({"time_s": elapsed, "peak_bytes": peak, **extra()}), flush=True)


def interleaved_rounds(
    script: str, names: list[str], arguments: list[str], repeat: int, echo: bool = False
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Start ``script --worker NAME *arguments`` for each name, then ``repeat`` rounds of one step each, in turn.

    Returns each worker's answers per step, and the error of each worker that did not become ready; ``echo`` prints
    every answer as a JSON line as it comes.
    """
    workers, failed = {}, {}
    for name in names:
        process = subprocess.Popen([sys.executable, script, "--worker", name, *arguments], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        answer = json.loads(process.stdout.readline() or '{"error": "the worker exited"}')  # type: ignore[union-attr]
        if echo:
            print(json.dumps({"impl": name, **answer}), flush=True)
        if answer.get("ready"):
            workers[name] = process
        else:
            failed[name] = answer.get("error", "no answer")
            process.wait()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
    for _ in range(repeat):
        for name, process in workers.items():
            process.stdin.write("run\n")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
            runs[name].append(json.loads(process.stdout.readline()))  # type: ignore[union-attr]
            if echo:
                print(json.dumps({"impl": name, **runs[name][-1]}), flush=True)
    for process in workers.values():
        process.stdin.write("exit\n")  # type: ignore[union-attr]
        process.stdin.close()  # type: ignore[union-attr]
        process.wait()
    return runs, failed
