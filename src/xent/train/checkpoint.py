"""Checkpoints written atomically and read back with ``weights_only=True``.

A checkpoint holds everything an exact resume needs: model, optimizer, scheduler and grad-scaler state, the epoch,
the metrics history and every random number generator (torch CPU and CUDA, NumPy, Python), and the SHA-256 of all
of it: a flipped byte that still unpickles (a weight, an RNG key) is an error when read back, never a silently
different resume. It stays a plain dict that ``torch.load(path, weights_only=True)`` reads.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch

from xent.train.config import ConfigError

LAST = "last.pt"
BEST = "best.pt"


def rng_state() -> dict[str, Any]:
    # the legacy tuple, which get_state returns by default
    _, keys, position, has_gauss, cached = cast(
        tuple[str, npt.NDArray[np.uint32], int, int, float], np.random.get_state()
    )
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))  # fmt: skip
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def digest(state: Any) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes and every other value's ``repr``, in
    the order the containers hold them (a dict's insertion order survives ``torch.save``)."""
    hasher = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            hasher.update(f"tensor {value.dtype} {tuple(value.shape)};".encode())
            hasher.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            hasher.update(f"dict {len(value)};".encode())
            for key, item in value.items():
                visit(key)
                visit(item)
        elif isinstance(value, (list, tuple)):
            hasher.update(f"{type(value).__name__} {len(value)};".encode())
            for item in value:
                visit(item)
        else:
            hasher.update(f"{type(value).__name__} {value!r};".encode())

    visit(state)
    return hasher.hexdigest()


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` and its :func:`digest` to a temporary file in the same directory, flush it to disk, then
    rename over ``path``: a reader (or a resume after ``kill -9``) sees the old checkpoint or the new one, never half
    of one."""
    payload = {**payload, "sha256": digest(payload)}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(payload, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


# What every checkpoint of `xent train` holds; anything else is not one.
KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_val", "train_seconds", "history", "rng")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read back: truncated, corrupted, or not a checkpoint of ``xent train``."""


def load(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, or a :class:`CheckpointError` that says in one line what is wrong with it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds for damaged files: name the file, not the kind
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:120]
        raise CheckpointError(f"{path} is unreadable (truncated or corrupted: {reason})") from None
    missing = [key for key in KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of xent train (no {', '.join(missing)})")
    saved = state.pop("sha256", None)  # checkpoints written before the digest have none
    if saved is not None and saved != digest(state):
        raise CheckpointError(f"{path} is corrupted: its content does not match the SHA-256 saved with it")
    return cast(dict[str, Any], state)  # a dict: checked above
