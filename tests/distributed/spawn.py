"""Processes for the distributed tests: spawned, and failed rather than waited on forever if a rank hangs."""

from __future__ import annotations

import time

import pytest
import torch

DEADLINE_S = 240


def spawn_and_wait(worker, args: tuple, world: int) -> None:
    """``torch.multiprocessing.spawn(worker, args, nprocs=world)``, failing the test when the ranks have not all
    finished within :data:`DEADLINE_S` (a collective one rank never joins would otherwise hang the suite)."""
    context = torch.multiprocessing.spawn(worker, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {DEADLINE_S} s")
