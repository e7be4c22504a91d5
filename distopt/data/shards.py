"""``distopt.data.shards``: data larger than memory as shard files plus a reader.

The global order of epoch ``e`` (also in the README):

1. the shards in the order ``torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed + e))``;
2. within shard ``i``, the reader's records through a shuffle buffer of ``shuffle_buffer``
   slots (:func:`record_order`), seeded from ``(seed, e, i)``;
3. the epochs back to back: a step that crosses the end of epoch ``e`` takes the rest from
   the start of epoch ``e + 1``.

Each worker reads only what it needs: a reader that returns a sized, indexable object (a
memory-mapped ``.npy`` array, a list) is indexed at the worker's own records; one that
returns an iterator is read whole, once per shard the worker's samples come from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

SHUFFLE_BUFFER = 1024  # records a shard's shuffle buffer holds (1: the reader's order)
_MIX = 1_000_003  # a prime mixing (seed, epoch, shard) into one generator seed


@dataclass(frozen=True)
class Shards:
    """Shard files and the reader of one shard; built by :func:`shards`."""

    paths: tuple[str, ...]
    read: Callable[[str], Iterable]
    shuffle_buffer: int = SHUFFLE_BUFFER


def shards(paths: Iterable[str | os.PathLike], read: Callable[[str], Iterable],
           shuffle_buffer: int = SHUFFLE_BUFFER) -> Shards:
    """Shard files as a dataset for ``Trainer(data=...)``.

    Args:
        paths: the shard files (at least one), e.g. tokenised ``.npy``/``.bin`` files.
        read: a module-level function ``read(path)`` returning the shard's samples, either
            sized and indexable (``len`` and ``[i]``: only the records a worker needs are
            read) or any iterable (read whole when needed). Every sample must have the
            structure of the first.
        shuffle_buffer: slots of each shard's seeded shuffle buffer (1 keeps the reader's order).

    Raises:
        ValueError: no paths, or ``shuffle_buffer`` < 1.
        FileNotFoundError: a shard file does not exist (its path named).
        TypeError: ``read`` is not a module-level function.
    """
    paths = tuple(os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths))
    if not paths:
        raise ValueError("shards(paths=[]): give at least one shard file")
    if not isinstance(shuffle_buffer, int) or isinstance(shuffle_buffer, bool) or shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer={shuffle_buffer!r} must be an int >= 1 (1: the reader's order)")
    qualname = getattr(read, "__qualname__", "")
    if not callable(read) or "<" in qualname:
        raise TypeError(f"read={qualname or type(read).__name__} must be a module-level function read(path) -> "
                        f"samples (the workers import it by name)")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"shard {p!r} does not exist (or is not a file): fix the path or drop it")
    return Shards(paths, read, shuffle_buffer)


def shard_order(count: int, seed: int, epoch: int) -> list[int]:
    """The shards' order in ``epoch``: ``randperm(count)`` seeded with ``seed + epoch``."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def record_order(n: int, buffer: int, seed: int, epoch: int, shard: int) -> list[int]:
    """The order of a shard's ``n`` records after its shuffle buffer.

    A generator seeded with ``((seed * 1_000_003 + epoch) * 1_000_003 + shard) mod 2**63``
    draws, for each record ``t >= buffer`` in the reader's order, a slot
    ``torch.randint(buffer)``: the record in that slot is emitted and ``t`` takes its place.
    Once the reader ends, the buffer is emitted in ``torch.randperm`` order from the same
    generator. (With ``n <= buffer`` this is one ``randperm`` of the shard.)
    """
    g = torch.Generator().manual_seed(((seed * _MIX + epoch) * _MIX + shard) % 2**63)
    slots = list(range(min(buffer, n)))
    out = []
    if n > buffer:
        for t, j in zip(range(buffer, n), torch.randint(buffer, (n - buffer,), generator=g).tolist()):
            out.append(slots[j])
            slots[j] = t
    return out + [slots[i] for i in torch.randperm(len(slots), generator=g).tolist()]
