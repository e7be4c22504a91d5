"""A worker's reader of a stream (an ``IterableDataset``, or Ray Data through
:mod:`distopt.data.ray_data`): the global stream from any read position.

Epoch ``e``'s stream is ``iter(dataset)`` after ``dataset.set_epoch(e)`` (when the dataset
has ``set_epoch``); the epochs follow one another. A stream has no random access, so every
worker reads the whole global stream and keeps its own share; a position it is not at is
reached by reading the epoch again from its start and skipping to the offset.
"""
from __future__ import annotations

from typing import Any

from distopt.data import positions
from distopt.data.errors import DataError
from distopt.data.positions import Position
from distopt.data.samples import StructureCheck


class StreamReader:
    """Reads ``count`` samples of the global stream from a read position."""

    def __init__(self, dataset: Any, global_batch_size: int) -> None:
        self.dataset, self.batch = dataset, global_batch_size
        self._it: Any = None
        self._at: Position | None = None  # the position of the live iterator's next sample
        self._last: tuple | None = None  # (position, count, samples, next): a redone step reads nothing
        self._check = StructureCheck()

    def read(self, position: Position, count: int) -> tuple[list, Position]:
        """The ``count`` samples from ``position`` and the position after them.

        Raises:
            DataError: an epoch yields fewer samples than one global batch, the stream raised,
                a sample's structure differs from the first's, or the stream ends before
                ``position`` (it is not the stream the position was taken from).
        """
        if self._last is not None and self._last[:2] == (position, count):
            return self._last[2], self._last[3]
        if self._at != position:
            self._seek(position)
        samples = []
        while len(samples) < count:
            sample = self._next()
            if sample is _END:
                self._next_epoch()
                continue
            samples.append(self._check(sample, self._where))
            self._at = {**self._at, "offset": self._at["offset"] + 1}
        self._last = (position, count, samples, self._at)
        return samples, self._at

    def _where(self) -> str:
        return f"sample {self._at['offset']} of epoch {self._at['epoch']}"

    def _next(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            return _END
        except Exception as e:
            raise DataError(f"the stream raised at {self._where()}: {type(e).__name__}: {e}") from e

    def _start(self, epoch: int) -> None:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        self._it, self._at = iter(self.dataset), positions.make(epoch, 0, 0)

    def _next_epoch(self) -> None:
        n, epoch = self._at["offset"], self._at["epoch"]
        if n < self.batch:
            raise DataError(f"epoch {epoch} of the stream yielded {n} samples, fewer than one global batch of "
                            f"{self.batch}: add data or lower global_batch_size")
        self._start(epoch + 1)

    def _seek(self, position: Position) -> None:
        self._start(position["epoch"])
        for _ in range(position["offset"]):
            if self._next() is _END:
                raise DataError(f"epoch {position['epoch']} of the stream ended after {self._at['offset']} "
                                f"samples, before the read position's offset {position['offset']}: the stream is "
                                f"not the one the position was taken from, or its order is not deterministic")
            self._at = {**self._at, "offset": self._at["offset"] + 1}


_END = object()
