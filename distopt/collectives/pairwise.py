"""gloo collectives as direct sends between every pair of ranks.

On one host they move the traffic of a ring in about half the time of gloo's own, and the
reduce-scatter is deterministic: one rank adds up each chunk, always in the same order.
Receive buffers are kept from one call to the next: a fresh large allocation costs more
than the copy it receives (page faults), and buckets come in a few fixed sizes.
"""
from __future__ import annotations

from typing import Callable

import torch


class Pairwise:
    """One rank's pairwise exchanges on a gloo process group, and its kept receive buffers."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def reduce_scatter(self, send: torch.Tensor, out: torch.Tensor) -> tuple[Callable[[object, int], list],
                                                                             Callable[[], None]]:
        """``(start, total)``: ``start(pg, tag)`` sends every peer its chunk of ``send`` and
        receives theirs of this rank's chunk; ``total()``, once those are done, writes this
        rank's own chunk plus the peers' in rank order into ``out``. Only the peers' chunks
        need scratch, so ``out`` may be ``send``'s own chunk."""
        w, r, c = self.world_size, self.rank, out.numel()
        rows = self._scratch(send, (w - 1) * c)
        peers = [j for j in range(w) if j != r]

        def start(pg, tag: int) -> list:
            return [work for i, j in enumerate(peers) for work in (
                pg.send([send[j * c:(j + 1) * c]], j, tag), pg.recv([rows[i * c:(i + 1) * c]], j, tag))]

        def total() -> None:
            own = send[r * c:(r + 1) * c]
            if w == 1:
                out.copy_(own)
            else:
                torch.add(own, rows[:c], out=out)
            for i in range(1, w - 1):
                out.add_(rows[i * c:(i + 1) * c])
            self._free.setdefault((rows.numel(), rows.dtype, rows.device), []).append(rows)
        return start, total

    def allgather(self, send: torch.Tensor, buf: torch.Tensor) -> Callable[[object, int], list]:
        """``start(pg, tag)`` sends ``send`` to every peer and receives theirs into ``buf``
        (rank order); this rank's own part is copied in now unless it is there already."""
        w, r, c = self.world_size, self.rank, send.numel()
        if buf[r * c:].data_ptr() != send.data_ptr():
            buf[r * c:(r + 1) * c].copy_(send)
        return lambda pg, tag: [work for j in range(w) if j != r for work in (
            pg.send([send], j, tag), pg.recv([buf[j * c:(j + 1) * c]], j, tag))]

    def _scratch(self, like: torch.Tensor, numel: int) -> torch.Tensor:
        free = self._free.get((numel, like.dtype, like.device))
        return free.pop() if free else like.new_empty(numel)
