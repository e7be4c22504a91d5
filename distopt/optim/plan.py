"""The sharding plan: which elements of the flat parameter buffer each rank owns.

Plain data from a pure function of tensor sizes and world size, so every rank derives
the same plan without talking, and it can be logged, stored in a checkpoint and tested.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from distopt.collectives.buckets import DEFAULT_BUCKET_BYTES, Layout, concat_layouts, groups_from_end, layout

# 32 fp32 elements = 128 bytes: shard starts stay cache-line and vector aligned.
ALIGN = 32


class ShardPlan(NamedTuple):
    """Flat-buffer layout plus ownership: in every bucket, rank r owns the r-th of W equal slices."""

    world_size: int
    align: int
    layout: Layout

    def ranges(self, rank: int) -> list[tuple[int, int]]:
        """``rank``'s ``[start, end)`` in the flat buffer, one contiguous range per bucket."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is not in a plan for {self.world_size} ranks")
        out = []
        for start, end in self.layout.buckets:
            size = (end - start) // self.world_size
            out.append((start + rank * size, start + (rank + 1) * size))
        return out

    def place(self, rank: int, shard, full) -> None:
        """Copy ``rank``'s flat shard (its range of every bucket, in bucket order) into ``full``."""
        pos = 0
        for start, end in self.ranges(rank):
            full[start:end].copy_(shard[pos:pos + end - start])
            pos += end - start

    def unflatten(self, full, shapes: Sequence) -> list:
        """Views of the flat buffer ``full``, one per tensor of the plan, with ``shapes``."""
        lay = self.layout
        return [full[o:o + n].view(tuple(shape)) for o, n, shape in zip(lay.offsets, lay.numels, shapes)]

    def shard_numel(self, rank: int = 0) -> int:
        """Elements ``rank`` owns (the same for every rank)."""
        return sum(e - s for s, e in self.ranges(rank))

    def to_dict(self) -> dict:
        """The plan as JSON/msgpack-ready plain data."""
        return {"world_size": self.world_size, "align": self.align, "numels": list(self.layout.numels),
                "offsets": list(self.layout.offsets), "buckets": [list(b) for b in self.layout.buckets],
                "total": self.layout.total}

    def describe(self) -> str:
        """One line for logs."""
        n = sum(self.layout.numels)
        return (f"plan: {len(self.layout.numels)} tensors, {n} elements in {len(self.layout.buckets)} buckets, "
                f"{self.world_size} ranks x {self.shard_numel()} elements (padding {self.layout.total - n})")


def plan(numels: Sequence[int], world_size: int, bucket_numel: int = DEFAULT_BUCKET_BYTES // 4,
         align: int = ALIGN, units: Sequence[object] | None = None, last_bucket_numel: int | None = None) -> ShardPlan:
    """Shard tensors of ``numels`` elements over ``world_size`` ranks.

    Tensors are packed in order into buckets of at most ``bucket_numel`` elements (see
    :func:`distopt.collectives.layout` for ``units`` and ``last_bucket_numel``); each
    bucket is zero-padded to a multiple of ``world_size * align`` and cut into
    ``world_size`` equal contiguous slices. Every rank's shard therefore has the same size,
    at most ``align`` elements per bucket above ``ceil(n / world_size)``.

    Raises:
        ValueError: ``world_size < 1``, ``align < 1`` or no tensors.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive int")
    if align < 1:
        raise ValueError(f"align={align} must be >= 1")
    if len(numels) == 0:
        raise ValueError("plan() needs at least one tensor")
    return ShardPlan(world_size, align, layout(numels, bucket_numel, world_size * align, units, last_bucket_numel))


def matrix_layout(numels: Sequence[int], world_size: int, bucket_numel: int, align: int = ALIGN,
                  last_bucket_numel: int | None = None) -> Layout:
    """Whole tensors, each inside one rank's slice of its bucket, balanced by size; pure.

    The tensors, largest first, are dealt in rows of ``world_size``: in each row the largest
    goes to the rank that owns the fewest elements so far. A row gives every rank a slot as
    long as its largest tensor (rounded up to ``align``; a tensor shorter than the slot
    leaves padding). Rows, in the order of their first tensor, are packed into buckets of
    at most ``bucket_numel`` elements (one row may exceed it), and rank ``r``'s slice of a
    bucket is its slot of every row, back to back: the equal slices of :class:`ShardPlan`.
    """
    w = world_size
    load, rows = [0] * w, []
    by_size = sorted(range(len(numels)), key=lambda i: (-numels[i], i))
    for k in range(0, len(by_size), w):
        row, owner = by_size[k:k + w], {}
        for i, r in zip(row, sorted(range(w), key=lambda r: (load[r], r))):
            owner[r] = i
            load[r] += numels[i]
        rows.append((-(-max(1, numels[row[0]]) // align) * align, owner, min(row)))
    rows.sort(key=lambda row: row[2])
    sizes = [w * slot for slot, _, _ in rows]
    offsets, buckets, bucket_of = [0] * len(numels), [], [0] * len(numels)
    pos = 0
    for b, members in enumerate(groups_from_end(sizes, list(range(len(rows))), bucket_numel,
                                                   last_bucket_numel or bucket_numel)):
        width = sum(rows[j][0] for j in members)
        inner = 0
        for j in members:
            slot, owner, _ = rows[j]
            for r, i in owner.items():
                offsets[i], bucket_of[i] = pos + r * width + inner, b
            inner += slot
        buckets.append((pos, pos + w * width))
        pos += w * width
    return Layout(tuple(offsets), tuple(int(n) for n in numels), tuple(buckets), pos, tuple(bucket_of))


class Arrangement(NamedTuple):
    """How an optimizer's parameters sit in its plan: which tensor is at each plan position,
    and the group and dtype of every bucket (a bucket never mixes either)."""

    order: tuple[int, ...]  # plan position -> index of the tensor as given
    bucket_group: tuple[int, ...]
    bucket_dtype: tuple[torch.dtype, ...]
    launch: tuple[int, ...]  # buckets in the order their reductions start, the same on every rank


def arrange(names: Sequence[str], tensors: Sequence[torch.Tensor], group_of: Sequence[int], world_size: int,
            bucket_bytes: int = DEFAULT_BUCKET_BYTES, last_bucket_bytes: int | None = 2**20,
            matrix_groups: Sequence[int] = ()) -> tuple[ShardPlan, Arrangement]:
    """The plan of a ShardedOptimizer over ``world_size`` shards (1 at zero_stage 0); pure.

    Tensors are ordered by dtype (first seen first), then group, then as given; each
    (dtype, group) run is cut into buckets of its own (:func:`plan`), so one flat buffer per
    dtype holds its buckets back to back and each bucket's shard updates with one group's
    hyperparameters. A module's parameters (names sharing the part before the last dot)
    share a bucket. Reductions start in the order backward completes buckets: the bucket
    whose first tensor comes latest in the given order first. Groups in ``matrix_groups``
    (whole-matrix rules: Muon) are laid out by :func:`matrix_layout`, so each tensor is
    updated whole by one rank.
    """
    dtypes = list(dict.fromkeys(t.dtype for t in tensors))
    last_bucket_bytes = min(last_bucket_bytes, bucket_bytes) if last_bucket_bytes else None
    order = sorted(range(len(tensors)), key=lambda i: (dtypes.index(tensors[i].dtype), group_of[i], i))
    runs: dict[tuple, list[int]] = {}
    for i in order:
        runs.setdefault((tensors[i].dtype, group_of[i]), []).append(i)
    layouts, bucket_group, bucket_dtype = [], [], []
    for (dtype, group), members in runs.items():
        size = dtype.itemsize
        units = [names[i].rsplit(".", 1)[0] if "." in names[i] else names[i] for i in members]
        numels, cap = [tensors[i].numel() for i in members], max(1, bucket_bytes // size)
        last_cap = max(1, last_bucket_bytes // size) if last_bucket_bytes else None
        layouts.append(matrix_layout(numels, world_size, cap, ALIGN, last_cap) if group in matrix_groups else
                       plan(numels, world_size, cap, units=units, last_bucket_numel=last_cap).layout)
        bucket_group += [group] * len(layouts[-1].buckets)
        bucket_dtype += [dtype] * len(layouts[-1].buckets)
    lay = concat_layouts(layouts)
    first = [min(order[i] for i in lay.members(b)) if lay.members(b) else -1 for b in range(len(lay.buckets))]
    launch = sorted(range(len(lay.buckets)), key=lambda b: (-first[b], -b))
    return ShardPlan(world_size, ALIGN, lay), Arrangement(tuple(order), tuple(bucket_group), tuple(bucket_dtype),
                                                          tuple(launch))


def shard_count(world_size: int, zero_stage: int) -> int:
    """How many shards the plan of ``world_size`` ranks has: stage 0 is the plan with one
    shard (every rank holds and updates all of it), stages 1 and 2 cut it in ``world_size``.

    Raises:
        ValueError: ``zero_stage`` is not 0, 1 or 2.
    """
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage={zero_stage!r} must be 0, 1 or 2")
    return world_size if zero_stage >= 1 else 1


def build_plan(names: Sequence[str], tensors: Sequence[torch.Tensor], world_size: int, zero_stage: int,
               bucket_bytes: int = DEFAULT_BUCKET_BYTES, last_bucket_bytes: int | None = 2**20,
               group_of: Sequence[int] | None = None,
               matrix_groups: Sequence[int] = ()) -> tuple[ShardPlan, Arrangement]:
    """The plan and arrangement a ShardedOptimizer with these arguments uses (pure)."""
    return arrange(names, tensors, group_of or [0] * len(tensors), shard_count(world_size, zero_stage),
                   bucket_bytes, last_bucket_bytes, matrix_groups)
