"""CPU buffers kept for the next call: what PyTorch's caching allocator does on CUDA, for the few large buffers of
the fused kernels that every training step asks for again.

Those buffers are as large as logits: the gradient of cross-entropy on logits (256 MB for 4,096 × 16,384 float32),
the chunk of logits a linear head forms, a distillation's teacher chunk. On a GPU PyTorch's caching allocator hands
back the block the last step freed. On the CPU a block that large comes straight from the operating system (glibc
serves requests above 32 MB by ``mmap`` and unmaps them on free), so every step faults in fresh 4 KB pages, each
zeroed by the kernel: on the 2-core CI machine 45 ms of the 98 ms a forward + backward of that cross-entropy took,
against 58 ms for the kernel itself.

So on the CPU the kernels take those buffers from here::

    request (shape, dtype) of at least MIN_BYTES
      a kept storage is free (nothing but this cache holds it) and fits (request ≤ it ≤ twice the request)
        → a new tensor on it: no page is faulted in again
      else → a new buffer, kept in place of a free one (the least recently used) while fewer than SLOTS are kept

"Free" is the storage's reference count: a gradient still held anywhere — a leaf's ``.grad`` that accumulates, a
tensor kept by the caller, a view of either — keeps its storage counted, and the next call gets a new buffer. The
tensor handed out is a plain tensor on that storage (not a view), so autograd moves a gradient into a leaf's
``.grad`` without a copy, as it does a new one.

The price is the one the CUDA allocator asks: between calls the process keeps these buffers resident
(:func:`cached_bytes`, at most :data:`SLOTS` of them). Within a training step nothing changes — the buffers are alive
at the step's peak either way. :func:`empty_cache` gives them back; :func:`set_buffer_cache` (or
``XENT_BUFFER_CACHE=0`` in the environment) turns the cache off. ``xent bench`` counts kept buffers in the peak
memory it reports.
"""

from __future__ import annotations

import itertools
import os
import threading

import torch

# Below this glibc's heap serves a repeated request itself (its mmap threshold grows to the size of a freed block, up
# to 32 MB), and keeping a buffer would only hold memory.
MIN_BYTES = 16 << 20
# Two buffers are the most one call asks for at once: a distillation's student and teacher chunks.
SLOTS = 2

_enabled = os.environ.get("XENT_BUFFER_CACHE", "1") != "0"
_kept: dict[int, torch.UntypedStorage] = {}  # last use (a counter) → storage
_clock = itertools.count()
_lock = threading.Lock()


def set_buffer_cache(enabled: bool) -> None:
    """Keep the large CPU buffers of the fused kernels for the next call (``True``, the default unless the
    environment sets ``XENT_BUFFER_CACHE=0``) or allocate them anew at every call (``False``, which also frees what
    is kept). On the CPU a buffer of 16 MB or more comes from the operating system page by page at every call:
    keeping the gradient of cross-entropy on 4,096 × 16,384 logits saves about half of the step's time, and holds
    one logits-sized buffer between calls. CUDA tensors never use it (PyTorch's caching allocator does this there).
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    _enabled = enabled
    if not enabled:
        empty_cache()


def empty_cache() -> int:
    """Let go of the kept CPU buffers (one still in use stays alive with its holder); returns the bytes kept. Like
    ``torch.cuda.empty_cache()``, for the memory xent keeps."""
    with _lock:
        kept = sum(storage.nbytes() for storage in _kept.values())
        _kept.clear()
    return kept


def cached_bytes() -> int:
    """Bytes of the kept buffers that nothing but the cache holds now: resident memory xent keeps between calls."""
    with _lock:
        return sum(storage.nbytes() for storage in _kept.values() if _is_free(storage))


def _is_free(storage: torch.UntypedStorage) -> bool:
    return torch._C._storage_Use_Count(storage._cdata) == 1  # the cache's own reference only


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor, for a buffer the kernel writes whole: on the CPU from a kept storage that
    is free and fits (see the module docstring), else new."""
    strides: list[int] = []
    nbytes = dtype.itemsize
    for size in reversed(shape):
        strides.insert(0, nbytes // dtype.itemsize)
        nbytes *= size
    if not _enabled or device.type != "cpu" or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:
        free = {use: storage for use, storage in _kept.items() if _is_free(storage)}
        fits = [use for use, storage in free.items() if nbytes <= storage.nbytes() <= 2 * nbytes]
        if fits:
            use = min(fits, key=lambda use: free[use].nbytes())
            storage = _kept.pop(use)
            _kept[next(_clock)] = storage
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)
        fresh = torch.empty(shape, dtype=dtype, device=device)
        if len(_kept) >= SLOTS and free:
            del _kept[min(free)]  # the least recently used free one
        if len(_kept) < SLOTS:
            _kept[next(_clock)] = fresh.untyped_storage()
        return fresh
