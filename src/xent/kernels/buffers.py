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
      a kept storage is free and fits (request ≤ it ≤ twice the request)
        → a new tensor on the smallest such storage: no page is faulted in again
      else (the shapes changed) → the free kept storages are let go, and a new buffer is kept beside those in use
        (at most SLOTS kept)

"Free" means nothing but this cache holds the storage: no tensor on it (its C++ reference count — a gradient still
held anywhere, a leaf's ``.grad`` that accumulates, a view, a tensor kept by the caller), no Python reference to the
storage object itself (``tensor.untyped_storage()`` returns the object the cache holds), and not moved to shared
memory (sent to another process by ``torch.multiprocessing``). A storage in use is never handed out, so nothing a
caller holds is written over. The tensor handed out is a plain tensor on that storage (not a view), so autograd moves
a gradient into a leaf's ``.grad`` without a copy, as it does a new one.

The price is the one the CUDA allocator asks: between calls the process keeps up to ``SLOTS`` buffers resident
(:func:`xent.cached_bytes`) — the last gradient of a cross-entropy on logits; a linear head's chunk of logits; both, for
a step that runs both; a distillation's two chunks — each at most twice what the call that made it asked for. In a
training step whose shapes repeat nothing else changes, since those buffers are alive at the step's peak either way.
A tensor on a kept storage may sit on up to twice its own size, as a view does: ``torch.save`` writes that storage
whole (save a ``.clone()`` to write just the tensor). :func:`xent.empty_cache` gives the buffers back;
:func:`xent.set_buffer_cache` (or ``XENT_BUFFER_CACHE=0`` in the environment) turns the cache off. ``xent bench`` counts
kept buffers in the peak memory it reports.
"""

from __future__ import annotations

import os
import sys
import threading

import torch

# Below this glibc's heap serves a repeated request itself (its mmap threshold grows to the size of a freed block, up
# to 32 MB), and keeping a buffer would only hold memory.
MIN_BYTES = 16 << 20
# Two buffers are the most one call asks for at once: a distillation's student and teacher chunks.
SLOTS = 2

_enabled = os.environ.get("XENT_BUFFER_CACHE", "1") != "0"
_kept: list[torch.UntypedStorage] = []
_lock = threading.Lock()


def _python_references(index: int) -> int:
    storage = _kept[index]
    return sys.getrefcount(storage)


# The Python references to a kept storage object when nobody else holds it: the list's, and those of the lookup
# itself (measured once, so that no interpreter's way of counting its own references is assumed).
_kept.append(torch.UntypedStorage(0))
_CACHE_REFERENCES = _python_references(0)
_kept.clear()


def _is_free(index: int) -> bool:
    if _python_references(index) > _CACHE_REFERENCES:  # first, while this frame holds no reference of its own
        return False  # someone holds the storage object
    storage = _kept[index]
    return torch._C._storage_Use_Count(storage._cdata) == 1 and not storage.is_shared()  # no tensor on it


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a lock held by a thread of the parent at the fork would never be released here


os.register_at_fork(after_in_child=_after_fork_in_child)


def set_buffer_cache(enabled: bool) -> None:
    """Keep the large CPU buffers of the fused kernels for the next call (``True``, the default unless the
    environment sets ``XENT_BUFFER_CACHE=0``) or allocate them anew at every call (``False``, which also frees what
    is kept). On the CPU a buffer of 16 MB or more comes from the operating system page by page at every call:
    keeping the gradient of cross-entropy on 4,096 × 16,384 logits saves about half of the step's time, and holds
    that buffer between calls (at most two buffers, see :mod:`xent.kernels.buffers`). CUDA tensors never use it
    (PyTorch's caching allocator does this there)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    _enabled = enabled
    if not enabled:
        empty_cache()


def empty_cache() -> int:
    """Let go of the kept CPU buffers; returns the bytes freed (a buffer still in use stays alive with its holder
    and is not counted). Like ``torch.cuda.empty_cache()``, for the memory xent keeps."""
    with _lock:
        freed = sum(_kept[index].nbytes() for index in range(len(_kept)) if _is_free(index))
        _kept.clear()
    return freed


def cached_bytes() -> int:
    """Bytes of the kept buffers that nothing but the cache holds now: resident memory xent keeps between calls."""
    with _lock:
        return sum(_kept[index].nbytes() for index in range(len(_kept)) if _is_free(index))


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides = [1] * len(shape)
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * max(shape[dim + 1], 1)
    return strides


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor, for a buffer the kernel writes whole: on the CPU from a kept storage that
    is free and fits (see the module docstring), else new."""
    nbytes = dtype.itemsize
    for size in shape:
        nbytes *= size
    if not _enabled or device.type != "cpu" or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:
        free = [index for index in range(len(_kept)) if _is_free(index)]
        fits = [index for index in free if nbytes <= _kept[index].nbytes() <= 2 * nbytes]
        if fits:
            storage = _kept[min(fits, key=lambda index: _kept[index].nbytes())]
            tensor = torch.empty(0, dtype=dtype, device=device)
            return tensor.set_(storage, 0, shape, _contiguous_strides(shape))
        # The shapes changed: what is free fits no more. Keep what is in use (until it is free) and the new buffer.
        _kept[:] = [_kept[index] for index in range(len(_kept)) if index not in free and not _kept[index].is_shared()]
        fresh = torch.empty(shape, dtype=dtype, device=device)
        if len(_kept) < SLOTS:
            _kept.append(fresh.untyped_storage())
        return fresh
