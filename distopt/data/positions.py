"""The read position of a stream: committed state, a small dict of ints.

``{"epoch": e, "shard": p, "offset": j}`` names the next sample of the global stream: sample
``j`` of shard ``p`` of epoch ``e``'s shard order (for ``shards``), or sample ``j`` of epoch
``e``'s stream (an ``IterableDataset`` or Ray Data, where ``shard`` is always 0). It is plain
msgpack data, so a checkpoint's manifest holds it as it is.
"""
from __future__ import annotations

from typing import Any

Position = dict  # {"epoch": int, "shard": int, "offset": int}
KEYS = ("epoch", "shard", "offset")


def start() -> Position:
    """The first sample of epoch 0."""
    return {"epoch": 0, "shard": 0, "offset": 0}


def make(epoch: int, shard: int, offset: int) -> Position:
    """A position from its three counters."""
    return {"epoch": epoch, "shard": shard, "offset": offset}


def check(position: Any, where: str = "read position") -> Position:
    """``position`` if it is a valid read position.

    Raises:
        ValueError: not a dict of exactly ``epoch``, ``shard`` and ``offset``, each an int >= 0.
    """
    if not isinstance(position, dict) or sorted(position) != sorted(KEYS) or \
            any(not isinstance(position[k], int) or isinstance(position[k], bool) or position[k] < 0 for k in KEYS):
        raise ValueError(f"{where} {position!r} is not a read position: a dict of ints >= 0 with keys {KEYS}")
    return {k: position[k] for k in KEYS}


def for_resume(kind: str, position: Any, next_step: int, where: str) -> Position | None:
    """The read position to resume data of ``kind`` from a checkpoint's ``position``.

    Raises:
        ValueError: a map-style run resumed with a stream or the other way round (a factory's
            kind is known only on the workers, which check it there), or a damaged position.
    """
    if kind == "map" and position is not None:
        raise ValueError(f"{where} was written by a run reading a stream (it holds the read position {position}): "
                         f"resume it with that stream, not a map-style dataset")
    if kind not in ("map", "factory") and position is None and next_step > 0:
        raise ValueError(f"{where} holds no read position (a map-style run wrote it): a stream cannot continue from "
                         f"it; resume it with its map-style dataset")
    return None if position is None else check(position, f"{where}: data_position")
