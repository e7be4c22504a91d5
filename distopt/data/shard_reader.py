"""A worker's reader of :func:`distopt.data.shards`: walks the global order by shard lengths and
reads only the records of its own samples."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from distopt.data import positions
from distopt.data.errors import DataError
from distopt.data.positions import Position
from distopt.data.samples import StructureCheck
from distopt.data.shards import Shards, record_order, shard_order

_KEEP_OPEN = 2  # shards kept open (or read into memory): a global batch rarely spans more


class ShardReader:
    """Reads the samples at any read position of a :class:`Shards` dataset."""

    def __init__(self, data: Shards, seed: int, global_batch_size: int) -> None:
        self.data, self.seed, self.batch = data, seed, global_batch_size
        self._lengths: dict[int, int] = {}
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._orders: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
        self._shard_orders: dict[int, list[int]] = {}
        self._checked_total = False
        self._check = StructureCheck()

    def walk(self, position: Position, count: int, collect: bool) -> tuple[list[tuple[int, int]], Position]:
        """The ``count`` samples from ``position`` as (shard index, record) pairs when
        ``collect``, and the position after them. Needs only shard lengths."""
        e, p, j = position["epoch"], position["shard"], position["offset"]
        order, out = self._order_of(e), []
        while count > 0:
            if p >= len(order):  # the epoch ends: the step goes on at the start of the next
                self._check_total()
                e, p, j = e + 1, 0, 0
                order = self._order_of(e)
                continue
            shard = order[p]
            n = self._length(shard)
            take = min(count, n - j)
            if collect and take > 0:
                records = self._records_order(e, shard, n)
                out += [(shard, records[t]) for t in range(j, j + take)]
            j, count = j + take, count - take
            if j >= n:
                p, j = p + 1, 0
        return out, positions.make(e, p, j)

    def read(self, addresses: list[tuple[int, int]]) -> list:
        """The samples at ``addresses`` (from :meth:`walk`), structure-checked."""
        out = []
        for shard, record in addresses:
            path = self.data.paths[shard]
            try:
                sample = self._shard(shard)[record]
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"shard {path!r} record {record}: the reader's sample raised "
                                f"{type(e).__name__}: {e}") from e
            out.append(self._check(sample, lambda: f"shard {path!r} record {record}"))
        return out

    def _order_of(self, epoch: int) -> list[int]:
        if epoch not in self._shard_orders:
            self._shard_orders = {epoch: shard_order(len(self.data.paths), self.seed, epoch)}
        return self._shard_orders[epoch]

    def _records_order(self, epoch: int, shard: int, n: int) -> list[int]:
        key = (epoch, shard)
        if key not in self._orders:
            self._orders[key] = record_order(n, self.data.shuffle_buffer, self.seed, epoch, shard)
            while len(self._orders) > _KEEP_OPEN:
                self._orders.popitem(last=False)
        return self._orders[key]

    def _check_total(self) -> None:
        if self._checked_total:
            return
        total = sum(self._length(i) for i in range(len(self.data.paths)))
        if total < self.batch:
            raise DataError(f"the {len(self.data.paths)} shards hold {total} samples in all, fewer than one global "
                            f"batch of {self.batch}: add shards or lower global_batch_size")
        self._checked_total = True

    def _length(self, shard: int) -> int:
        if shard not in self._lengths:
            self._lengths[shard] = len(self._shard(shard))
        return self._lengths[shard]

    def _shard(self, shard: int) -> Any:
        """Shard ``shard`` opened by the reader: kept as it is when sized and indexable,
        else read whole into a list."""
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.data.paths[shard]
        try:
            opened = self.data.read(path)
        except FileNotFoundError as e:
            raise DataError(f"shard {path!r} is missing ({e}): restore the file or drop it from paths") from e
        except Exception as e:
            raise DataError(f"shard {path!r}: read({path!r}) raised {type(e).__name__}: {e} (a truncated or "
                            f"damaged file?)") from e
        if not (hasattr(opened, "__len__") and hasattr(opened, "__getitem__")):
            opened = _read_whole(opened, path)
        self._open[shard] = opened
        while len(self._open) > _KEEP_OPEN:
            self._open.popitem(last=False)
        return opened


def _read_whole(samples: Any, path: str) -> list:
    out: list = []
    try:
        for sample in samples:
            out.append(sample)
    except Exception as e:
        raise DataError(f"shard {path!r} record {len(out)}: the reader raised {type(e).__name__}: {e} (a truncated "
                        f"or damaged file?)") from e
    return out
