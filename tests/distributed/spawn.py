"""Processes for the distributed tests: spawned, and failed rather than waited on forever if a rank hangs."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import time
import traceback
from collections.abc import Iterator

import pytest
import torch

DEADLINE_S = 240
# A rank still running this long before the deadline prints every thread's stack to its stderr, which the failed
# test shows: a hang says where it is (a collective, gloo's teardown — pytorch/pytorch#75097 — or the test's code).
STACKS_BEFORE_DEADLINE_S = 30


def _traced(rank: int, deadline_s: float, worker, *args) -> None:
    faulthandler.dump_traceback_later(max(1.0, deadline_s - STACKS_BEFORE_DEADLINE_S))
    worker(rank, *args)
    # The rank's work is done and reported (its queue and files are written synchronously). Leave without the
    # interpreter's teardown: a C++ thread of the process group or of a thread pool still joinable when static
    # objects are destroyed aborts the process ("terminate called without an active exception", SIGABRT, no Python
    # frame), which failed about one run in four of a busy machine.
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_and_wait(worker, args: tuple, world: int, deadline_s: float = DEADLINE_S) -> None:
    """``torch.multiprocessing.spawn(worker, args, nprocs=world)``, failing the test when the ranks have not all
    finished within ``deadline_s`` (a collective one rank never joins would otherwise hang the suite)."""
    context = torch.multiprocessing.spawn(_traced, args=(deadline_s, worker, *args), nprocs=world, join=False)
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {deadline_s:g} s")


def run_ranks(worker, args: tuple, world: int, deadline_s: float = DEADLINE_S) -> None:
    """:func:`spawn_and_wait` of ``worker(rank, *args, failures)``, failing the test with what the ranks put in
    ``failures`` (each its traceback) when one of them fails or hangs."""
    failures = torch.multiprocessing.get_context("spawn").SimpleQueue()
    try:
        spawn_and_wait(worker, (*args, failures), world, deadline_s)
    except Exception:
        messages = []
        while not failures.empty():
            messages.append(failures.get())
        pytest.fail("\n".join(messages) or "a rank failed")


@contextlib.contextmanager
def gloo_group(rank: int, world: int, store_path: str, failures) -> Iterator[None]:
    """A rank's body inside a gloo process group over a file store: the group started, the traceback of a failure
    put in ``failures`` (what :func:`run_ranks` reports) and raised, the group destroyed however the body ends. The
    body ends with a barrier where ranks must not leave while another is still in a collective."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
