"""One rank's micro-batches of step ``k`` from each kind of dataset, and the read position after it.

A source's :meth:`batches` is a pure function of (step, read position, rank, world size): the
same arguments give the same samples on any worker, before or after a failure. Map-style
datasets ignore the position (their contract indexes by step, ``distopt.data.sampling``);
streams and shards go from it.
"""
from __future__ import annotations

from typing import Any

from distopt.data import positions, sampling
from distopt.data.errors import DataError
from distopt.data.positions import Position
from distopt.data.ray_data import RayDataStream
from distopt.data.samples import collate_micro_batches, rank_share
from distopt.data.shard_reader import ShardReader
from distopt.data.stream import StreamReader


class MapSource:
    """A map-style dataset, indexed by the step (the position stays None)."""

    cheap_positions = True  # a loader process finds any step's batch without reading the ones before

    def __init__(self, data: Any, seed: int, global_batch_size: int, accumulation_steps: int) -> None:
        if len(data) < global_batch_size:
            raise DataError(f"dataset has {len(data)} samples, fewer than one global batch of {global_batch_size}: "
                            f"lower global_batch_size or add data")
        self.data, self.seed, self.batch, self.accumulation = data, seed, global_batch_size, accumulation_steps

    def batches(self, step: int, position: Position | None, rank: int, world_size: int) -> tuple[list, None]:
        indices = sampling.rank_indices(len(self.data), self.batch, self.seed, step, rank, world_size)
        return [sampling.fetch(self.data, chunk) for chunk in sampling.micro_batches(indices, self.accumulation)], None

    def next_position(self, step: int, position: Position | None) -> None:
        return None


class StreamSource:
    """An ``IterableDataset`` or Ray Data: every rank reads the global batch and keeps its share."""

    cheap_positions = False  # the next position is known only by reading the stream

    def __init__(self, stream: Any, global_batch_size: int, accumulation_steps: int) -> None:
        self.reader = StreamReader(stream, global_batch_size)
        self.batch, self.accumulation = global_batch_size, accumulation_steps

    def batches(self, step: int, position: Position | None, rank: int, world_size: int) -> tuple[list, Position]:
        samples, after = self.reader.read(at(step, position), self.batch)
        return collate_micro_batches(rank_share(samples, rank, world_size), self.accumulation), after

    def next_position(self, step: int, position: Position | None) -> Position:
        return self.reader.read(at(step, position), self.batch)[1]


class ShardSource:
    """``shards``: every rank walks the global order by shard lengths and reads only its records."""

    cheap_positions = True

    def __init__(self, data: Any, seed: int, global_batch_size: int, accumulation_steps: int) -> None:
        self.reader = ShardReader(data, seed, global_batch_size)
        self.batch, self.accumulation = global_batch_size, accumulation_steps

    def batches(self, step: int, position: Position | None, rank: int, world_size: int) -> tuple[list, Position]:
        position, per_rank = at(step, position), self.batch // world_size
        _, mine = self.reader.walk(position, rank * per_rank, collect=False)
        addresses, _ = self.reader.walk(mine, per_rank, collect=True)
        samples = self.reader.read(addresses)
        return collate_micro_batches(samples, self.accumulation), self.next_position(step, position)

    def next_position(self, step: int, position: Position | None) -> Position:
        return self.reader.walk(at(step, position), self.batch, collect=False)[1]


def at(step: int, position: Position | None) -> Position:
    """The read position of ``step``: the one given, or the stream's start at step 0.

    Raises:
        ValueError: a later step of a stream came without its position (a checkpoint from a
            map-style run resumed with a stream).
    """
    if position is not None:
        return positions.check(position)
    if step == 0:
        return positions.start()
    raise ValueError(f"step {step} of a stream needs its read position, and none was given: resume a stream only "
                     f"from a checkpoint its own run wrote (one from a map-style run has no read position)")


def make_source(dataset: Any, kind: str, seed: int, global_batch_size: int, accumulation_steps: int) -> Any:
    """The source for a built dataset of ``kind`` (see :mod:`distopt.data.kinds`)."""
    if kind == "map":
        return MapSource(dataset, seed, global_batch_size, accumulation_steps)
    if kind == "shards":
        return ShardSource(dataset, seed, global_batch_size, accumulation_steps)
    stream = RayDataStream(dataset) if kind == "ray" else dataset
    return StreamSource(stream, global_batch_size, accumulation_steps)
