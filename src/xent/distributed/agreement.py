"""The one agreement step of the vocab-parallel losses: what each rank checked alone, one all-gather, one verdict.

A rank can only check its own arguments, but a collective needs every rank. So each rank first runs every check it
can make alone (shapes, dtypes, options, its weight slice), keeping the error instead of raising it, and sums up in
a few numbers what the ranks must agree on (the loss and its options, the target, the dtype, …). One all-gather of
those numbers — a fixed-size int64 vector per rank, O(world) — shows every rank the same table::

    error  shard size  chunk size  value checks  ignore_index  target's min, its position, max, its position
    host code  device code

from which every rank reaches the same verdict at the same point: some rank failed (each raises that rank's error,
naming it); a target lies outside ``[0, V)`` on some rank (V is known only now; checked when value checks are on on
some rank); the ranks disagree on an argument (each raises an error naming the argument and the ranks); or the
shard sizes and the chunk size every rank uses. No rank waits in a collective another will not join, and none
combines statistics computed under another rank's loss. Only on the error path does a second collective
(``all_gather_object``) carry the failing rank's message and the arguments' printable forms.

The codes are fingerprints: ``host code`` hashes the printable form of every agreed argument (tensors by shape and
dtype), ``device code`` is a position-weighted checksum of the agreed tensors' bits (the target, per-class options),
computed on their device so that agreeing costs no host sync beyond reading the gathered table.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
import torch.distributed as dist

from xent._config import value_checks_enabled
from xent.losses import checks

__all__ = ["GIVEN", "Agreement", "Terms", "agree"]

_PRIME = 2_147_483_629  # checksums are kept modulo this prime (< 2^31) so that no sum of N < 2^32 terms overflows
_ERROR, _SIZE, _CHUNK, _CHECKS, _IGNORE, _MIN, _MIN_AT, _MAX, _MAX_AT, _HOST, _DEVICE = range(11)
_LENGTH = 11


class _Given:
    """An argument each rank passes in its own form (its slice of the class weight): only whether it is given is
    agreed on."""

    def __repr__(self) -> str:
        return "a tensor"


GIVEN = _Given()


@dataclasses.dataclass
class Terms:
    """What one rank brings to the agreement; filled as its local checks go, and left partly empty when one fails.

    ``agreed`` maps an argument's name (as the error shows it) to a value that must be the same on every rank: an
    int, float, string, tuple, ``None`` or a tensor (compared by shape, dtype and contents)."""

    error: Exception | None = None  # the first local check that failed
    size: int = 0  # the rank's shard of the vocabulary
    chunk_size: int = 0  # tokens per chunk the rank would choose (linear form); every rank takes the smallest
    target: torch.Tensor | None = None  # (N,) int64, the flattened target
    ignore_index: int = -100
    agreed: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Agreement:
    """What every rank learnt from the all-gather."""

    sizes: list[int]  # every rank's shard size, in rank order
    chunk_size: int  # the smallest rank's


def agree(terms: Terms, group: Any, device: torch.device) -> Agreement:
    """Gather every rank's :class:`Terms` (one all-gather of 11 int64 per rank) and raise on every rank alike —
    the same exception type and message — when some rank failed a check, the ranks disagree, or a target lies
    outside ``[0, V)`` (checked when value checks are on, on any rank). ``device`` holds the gathered vector (the
    group's backend must reach it)."""
    world = dist.get_world_size(group)
    mine = _vector(terms, device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table: list[list[int]] = torch.stack(gathered).tolist()  # the one host sync of the step
    # every rank sees the same table, so every rank raises the same error here, or none does
    failed = [rank for rank in range(world) if table[rank][_ERROR]]
    if failed:
        raise _verdict(terms, group, world, failed)
    sizes = [row[_SIZE] for row in table]
    if min(sizes) == 0:
        raise ValueError(f"every rank must hold at least one class of the vocabulary; shard sizes by rank: {sizes}")
    if any(row[_CHECKS] for row in table):  # before the targets' fingerprints: name the bad index, not a difference
        _check_range(table, sum(sizes))
    if len({(row[_HOST], row[_DEVICE]) for row in table}) > 1:
        raise _verdict(terms, group, world, failed)
    return Agreement(sizes, min(row[_CHUNK] for row in table))


def _vector(terms: Terms, device: torch.device) -> torch.Tensor:
    """The rank's row of the table, built on ``device`` without a host sync."""
    host = torch.zeros(_LENGTH, dtype=torch.long)
    host[_ERROR] = terms.error is not None
    if terms.error is not None:  # the rest is not read: the error path is taken
        return host.to(device)
    host[_SIZE], host[_CHUNK], host[_IGNORE] = terms.size, terms.chunk_size, terms.ignore_index
    host[_HOST] = _host_code(terms.agreed)
    vector = host.to(device)
    tensors = [value for _, value in sorted(terms.agreed.items()) if isinstance(value, torch.Tensor)]
    for position, tensor in enumerate(tensors, start=1):
        vector[_DEVICE] = (vector[_DEVICE] + _checksum(tensor).to(device) * position) % _PRIME
    target = terms.target
    if target is not None and target.numel():
        vector[_CHECKS] = value_checks_enabled(target)
        valid = target != terms.ignore_index
        low = torch.where(valid, target, torch.iinfo(torch.long).max)  # no valid entry: min > max, nothing flagged
        high = torch.where(valid, target, torch.iinfo(torch.long).min)
        low_at, high_at = low.argmin(), high.argmax()
        vector[_MIN : _MAX_AT + 1] = torch.stack([low[low_at], low_at, high[high_at], high_at]).to(device)
    return vector


def _host_code(agreed: dict[str, Any]) -> int:
    """A hash of the agreed arguments' printable forms that is the same in every process (``hash`` of a string is
    salted per process), as a signed int64."""
    text = repr(sorted((name, _printable(value, checksum=False)) for name, value in agreed.items()))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """A position-weighted checksum of a tensor's values (floats by their float64 bits), exact and independent of
    the order of summation: int64 terms below 2^31 each."""
    values = tensor.detach().reshape(-1)
    # floats by their bits: exact, where a float sum would depend on the order of summation
    values = values.to(torch.float64).view(torch.long) if values.is_floating_point() else values.to(torch.long)
    weights = torch.arange(values.numel(), device=values.device) % 65_521 + 1
    return (values % _PRIME * weights % _PRIME).sum() % _PRIME


def _printable(value: Any, checksum: bool = True) -> str:
    if isinstance(value, torch.Tensor):
        shown = f"a {value.dtype} tensor of shape {checks.shape_str(value.shape)}"
        return f"{shown} (checksum {int(_checksum(value))})" if checksum else shown
    return repr(value)


def _verdict(terms: Terms, group: Any, world: int, failed: list[int]) -> TypeError | ValueError:
    """The error every rank raises: the failing ranks' errors, or the arguments the ranks disagree on. One
    ``all_gather_object`` of each rank's error and arguments, on this path only."""
    error = None if terms.error is None else (type(terms.error).__name__, str(terms.error))
    shown = {} if terms.error is not None else {name: _printable(value) for name, value in terms.agreed.items()}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (error, shown), group=group)
    if failed:
        errors = [everyone[rank][0] for rank in failed]
        kind = TypeError if errors[0][0] == "TypeError" else ValueError  # the public boundary raises only these
        verdict = kind(_by_ranks({rank: message for rank, (_, message) in zip(failed, errors, strict=True)}))
    else:
        names = list(dict.fromkeys(name for _, arguments in everyone for name in arguments))  # the callers' order
        lines = []
        for name in names:
            values = {rank: arguments.get(name, "nothing") for rank, (_, arguments) in enumerate(everyone)}
            if len(set(values.values())) > 1:
                groups = _groups(values)
                lines.append(f"{name} differs between ranks: " + "; ".join(f"{v} on {r}" for v, r in groups))
        lines = lines or ["the ranks' arguments differ (their fingerprints do)"]
        every = "It must" if len(lines) == 1 else "They must"
        verdict = ValueError(". ".join(lines) + f". {every} be the same on every rank of the group")
    if terms.error is not None:
        verdict.__cause__ = terms.error
    return verdict


def _groups(by_rank: dict[int, str]) -> list[tuple[str, str]]:
    """``[(value, "ranks 0, 2"), (other, "rank 1")]`` in the order of each value's first rank."""
    ranks: dict[str, list[int]] = {}
    for rank, value in by_rank.items():
        ranks.setdefault(value, []).append(rank)
    return [(value, ("ranks " if len(rs) > 1 else "rank ") + ", ".join(map(str, rs))) for value, rs in ranks.items()]


def _by_ranks(messages: dict[int, str]) -> str:
    """``"rank 1: message"``, or ``"ranks 0, 2: message; rank 1: other"`` when several ranks failed."""
    return "; ".join(f"{ranks}: {message}" for message, ranks in _groups(messages))


def _check_range(table: list[list[int]], vocab: int) -> None:
    """Every rank's target in ``[0, V)`` or ``ignore_index``, from the gathered min and max: raised alike on every
    rank, naming the ranks, the class index and its position in the flattened target."""
    bad = {}
    for rank, row in enumerate(table):
        if row[_MIN] <= row[_MAX] and (row[_MIN] < 0 or row[_MAX] >= vocab):
            value, at = (row[_MAX], row[_MAX_AT]) if row[_MAX] >= vocab else (row[_MIN], row[_MIN_AT])
            bad[rank] = (
                f"target holds class index {value} at position {at} of the flattened target, outside [0, {vocab}) "
                f"for a vocabulary of {vocab} classes (and not ignore_index={row[_IGNORE]})"
            )
    if bad:
        raise ValueError(_by_ranks(bad))
