"""Blocks of rows shared out over threads once, for the CPU kernels: speed that holds when a core is taken.

Every PyTorch operation on the CPU is its own OpenMP parallel region: its threads split that one operation and meet
at a barrier at its end, where those that arrive first spin. A kernel that runs about eight operations on each of
hundreds of cache-sized blocks meets a barrier every few hundred microseconds; when another process takes a core,
each barrier waits for the thread that lost its core while its partner spins on the other. On the 2-core CI machine
with two busy processes beside it, the chunked cross-entropy of 4096 × 16384 logits took 2.7–4.5× PyTorch's time
this way (0.4× on the idle machine).

So the blocks are shared out instead::

    T = torch.get_num_threads() threads (the caller and T − 1 started here), intra-op threads set to 1
    each thread: take the next block from one queue → its operations, single-threaded → until none is left
    join: the one meeting point of the whole kernel

A thread that loses its core takes fewer blocks and nobody waits for it. The operations release the GIL; only their
dispatch — microseconds against a block's ~100 µs of work — is serial. The intra-op setting is process-wide: while
a kernel runs, other threads' operations run single-threaded; it is restored when the kernel returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

# Below this many blocks the threads' start (~0.1 ms each) and single-threaded operations cost more than the barriers
# they avoid: on the idle 2-core machine 1024 × 1024 logits (one 4 MB block) took 2 ms in one loop of OpenMP
# operations and 4 ms shared out; from 4,096 × 16,384 (64 blocks) the two are equal idle, and sharing wins busy.
MIN_BLOCKS = 4


def for_each_block(num_rows: int, block_rows: int, body: Callable[[slice], None], device: torch.device) -> None:
    """``body(rows)`` for each block of ``block_rows`` rows, in any order and on any thread; on the CPU with more
    than one intra-op thread and at least :data:`MIN_BLOCKS` blocks, shared out as the module docstring says.
    ``body`` must write only the rows it is given (blocks never overlap)."""
    blocks = [slice(start, min(start + block_rows, num_rows)) for start in range(0, num_rows, block_rows)]
    threads = min(torch.get_num_threads(), len(blocks))
    if device.type != "cpu" or threads <= 1 or len(blocks) < MIN_BLOCKS:
        for rows in blocks:
            body(rows)
        return
    queue = iter(blocks)
    lock = threading.Lock()
    errors: list[BaseException] = []
    inference = torch.is_inference_mode_enabled()  # grad and inference mode are per thread: the caller's hold here

    def work() -> None:
        try:
            with torch.inference_mode() if inference else torch.no_grad():
                while not errors:
                    with lock:
                        rows = next(queue, None)
                    if rows is None:
                        return
                    body(rows)
        except BaseException as error:  # re-raised by the caller below
            errors.append(error)

    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        helpers = [threading.Thread(target=work, name=f"xent-block-{i}", daemon=True) for i in range(threads - 1)]
        for helper in helpers:
            helper.start()
        work()
        for helper in helpers:
            helper.join()
    finally:
        torch.set_num_threads(intra_op)
    if errors:
        raise errors[0]
