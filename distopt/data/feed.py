"""A worker's data: its micro-batches of each step, on its device, and the read position after.

``Feed`` builds the dataset on the worker (a factory is called here), picks the source for
its kind and, with ``num_data_workers > 0``, loads in the background. It remembers the read
position at the start of the steps it has seen, so a checkpoint can store it.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from distopt.data.kinds import build
from distopt.data.loader import Prefetcher
from distopt.data.positions import Position
from distopt.data.samples import map_tensors
from distopt.data.sources import make_source


class Feed:
    """One rank's batches, step by step (see :mod:`distopt.data.sources` for the order)."""

    def __init__(self, data: Any, seed: int, global_batch_size: int, accumulation_steps: int,
                 device: torch.device, num_data_workers: int = 0, prefetch: int = 2) -> None:
        dataset, self.kind = build(data)
        self.source = make_source(dataset, self.kind, seed, global_batch_size, accumulation_steps)
        self.device = device
        # Ray Data streams its blocks in the background itself, and a forked loader process
        # could not use the worker's Ray connection: it is read on the training thread.
        self._loader = Prefetcher(self.source, num_data_workers, prefetch, device.type == "cuda") \
            if num_data_workers > 0 and self.kind != "ray" else None
        self._positions: dict[int, Position | None] = {}

    def batches(self, step: int, position: Position | None, rank: int, world_size: int
                ) -> tuple[list, Position | None, float]:
        """Step ``step``'s micro-batches for ``rank`` of ``world_size``, the read position after
        it, and the seconds the caller waited for them."""
        t0 = time.perf_counter()
        if self._loader is not None:
            batches, after = self._loader.get(step, position, rank, world_size)
        else:
            batches, after = self.source.batches(step, position, rank, world_size)
        batches = [to_device(b, self.device) for b in batches]
        self._positions = {step: position, step + 1: after}
        return batches, after, time.perf_counter() - t0

    def position_at(self, step: int) -> Position | None:
        """The read position at the start of 0-based ``step`` (None: map-style, or unknown)."""
        return self._positions.get(step)

    def close(self) -> None:
        """Stop any loader processes."""
        if self._loader is not None:
            self._loader.close()


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors on ``device`` (asynchronous copies from pinned memory)."""
    if device.type == "cpu":
        return batch
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))
