"""The files of a run directory: the writer's lock, atomic writes, and checkpoints read back with
``weights_only=True``.

A checkpoint holds everything an exact resume needs: model, optimizer, scheduler and grad-scaler state, the epoch,
the metrics history and every random number generator (torch CPU and CUDA, NumPy, Python); the identity of its run
(:func:`xent.train.config.run_identity`), so that a file copied from another run is refused by name instead of
failing in ``load_state_dict``; its format version; and the SHA-256 of all of it: a flipped byte that still
unpickles (a weight, an RNG key, a key's name) is an error when read back, never a silently different resume. It
stays a plain dict that ``torch.load(path, weights_only=True)`` reads.

One process writes a run directory: :func:`lock` holds an exclusive ``flock`` on its ``.lock`` for the run's life
(the kernel drops it when the process ends, ``kill -9`` included), and each temporary file is named after its
writer, so that no writer ever replaces or deletes another's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shlex
import sys
import uuid
from datetime import datetime
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


def temporary_path(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses: its process id and a random part."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def is_temporary(path: Path, name: str) -> bool:
    """Whether ``path`` is a temporary file of :func:`temporary_path` for the file ``name``."""
    return path.name.startswith(f".{name}.") and path.name.endswith(".tmp")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary file of this writer, flush it to disk, then rename it over ``path``: a reader
    (or a resume after ``kill -9``) sees the old file or the new one, never half of one. An error names ``path``,
    the file the user knows, not its temporary."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_path(path)
        try:
            with temporary.open("wb") as out:
                out.write(data.encode() if isinstance(data, str) else data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as error:
        raise type(error)(error.errno, error.strerror, str(path)) from None


FORMAT = 2  # 2: the run's identity, the format and the SHA-256 beside the state; 1 (no such keys): before digests
HEADER = ("format", "run", "sha256")


def save_atomic(payload: dict[str, Any], path: Path, *more: Path, run: dict[str, Any]) -> None:
    """Write the checkpoint ``payload`` of the run ``run`` (:func:`xent.train.config.run_identity`) atomically,
    with its format version and the :func:`digest` of everything, to ``path`` and to each of ``more`` (the same
    bytes, serialised and digested once: a new best epoch is both ``best.pt`` and ``last.pt``)."""
    payload = {**payload, "format": FORMAT, "run": run}
    buffer = io.BytesIO()
    torch.save({**payload, "sha256": digest(payload)}, buffer)
    for target in (path, *more):
        write_atomic(target, buffer.getvalue())


# What every checkpoint of `xent train` holds; anything else is not one.
KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_val", "train_seconds", "history", "rng")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read back: truncated, corrupted, or not a checkpoint of ``xent train``."""


def load(path: Path, *, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint at ``path``, or a :class:`CheckpointError` that says in one line what is wrong with it. With
    ``run`` (the identity of the run that reads it), a checkpoint of another run is refused, naming what differs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds for damaged files: name the file, not the kind
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:120]
        raise CheckpointError(f"{path} is unreadable (truncated or corrupted: {reason})") from None
    missing = [key for key in KEYS if not isinstance(state, dict) or key not in state]
    if len(missing) == len(KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of xent train (no {', '.join(missing)})")
    # from here on a dict that holds some of the keys: a missing one whose name was damaged is an unknown one
    unknown = sorted(str(key) for key in state if key not in KEYS and key not in HEADER)
    if missing and not unknown:
        raise CheckpointError(f"{path} is not a checkpoint of xent train (no {', '.join(missing)})")
    # The key set is exact: a checkpoint written before digests holds KEYS and nothing else, one of today holds
    # KEYS and HEADER. A flipped byte in a key's name ("sha256" -> "sh`256") leaves a key of neither: damage, not a
    # legacy file whose digest is not checked.
    header = [key for key in HEADER if key in state]
    if unknown or header not in ([], list(HEADER)):
        named = ", ".join(repr(key) for key in unknown) or f"only {', '.join(header)} of {', '.join(HEADER)}"
        raise CheckpointError(f"{path} is corrupted: its keys are damaged ({named})")
    if header:
        saved = state.pop("sha256")
        if saved != digest(state):
            raise CheckpointError(f"{path} is corrupted: its content does not match the SHA-256 saved with it")
        if state["format"] != FORMAT:
            raise CheckpointError(f"{path} has checkpoint format {state['format']}; this xent reads {FORMAT}")
        if run is not None and state["run"] != run:
            raise CheckpointError(f"{path} belongs to another run ({describe_difference(state['run'], run)})")
    return cast(dict[str, Any], state)  # a dict: checked above


def describe_difference(theirs: dict[str, Any], ours: dict[str, Any], limit: int = 4) -> str:
    """``"its model linear, loss focal; this run's mlp, ce"``: the first fields in which two identities differ."""
    fields = [key for key in {**theirs, **ours} if key != "sha256" and theirs.get(key) != ours.get(key)][:limit]
    mine = ", ".join(f"{key} {theirs.get(key)}" for key in fields)
    this = ", ".join(str(ours.get(key)) for key in fields)
    return f"its {mine}; this run's {this}"


# --- the writer's lock ------------------------------------------------------------------------------------------

LOCK = ".lock"


class RunLocked(ConfigError):
    """Another process writes this run directory; the message names it."""


class Lock:
    """An exclusive ``flock`` on a run directory's ``.lock``, held until :meth:`release` or the process's end."""

    def __init__(self, directory: Path, flag: str) -> None:
        self.path = directory / LOCK
        self.flag = flag
        self._handle: Any = None

    def acquire(self) -> None:
        import fcntl  # POSIX; imported here so that reading checkpoints needs nothing of it

        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            try:
                who = json.loads(holder)
                described = f"process {who['pid']} ({who['command']}, since {who['since']})"
            except (ValueError, KeyError, TypeError):
                described = "another process"
            raise RunLocked(
                f"{self.flag}: {self.path.parent} is in use by {described}; wait for it to end or stop it, or use "
                "another directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        argv = list(getattr(sys, "orig_argv", sys.argv)) or ["python"]  # with the interpreter: python -m xent ...
        command = shlex.join([os.path.basename(argv[0]), *argv[1:]])[:300]
        since = datetime.now().isoformat(timespec="seconds")
        handle.write(json.dumps({"pid": os.getpid(), "command": command, "since": since}) + "\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None


def lock(directory: Path, flag: str) -> Lock:
    """Hold ``directory`` for this process's writes, or raise :class:`RunLocked` naming the process that does;
    ``flag`` (``"--resume DIR"``) starts the message."""
    directory.mkdir(parents=True, exist_ok=True)
    held = Lock(directory, flag)
    held.acquire()
    return held


def remove_stale_temporaries(directory: Path, names: tuple[str, ...]) -> None:
    """Delete the temporary files a killed writer left for ``names``: under the lock, no writer owns them."""
    for path in directory.glob(".*.tmp"):
        if any(is_temporary(path, name) for name in names) and path.is_file():
            path.unlink(missing_ok=True)
