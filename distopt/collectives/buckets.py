"""Flat-buffer bucketing: many tensors live as views of one buffer cut into buckets.

One collective per bucket serves every tensor in it. Tensors created through a
:class:`FlatBuffer` are views, so nothing is copied in or out; loose tensors go through
:func:`allreduce_tensors`, which packs them per bucket.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from distopt.collectives.base import Communicator

DEFAULT_BUCKET_BYTES = 25 * 2**20


class Layout(NamedTuple):
    """Where each tensor sits in the flat buffer, and how the buffer is cut into buckets."""

    offsets: tuple[int, ...]  # start of tensor i
    numels: tuple[int, ...]
    buckets: tuple[tuple[int, int], ...]  # [start, end) of each bucket, end padded
    total: int  # flat buffer length, padding included
    bucket_of: tuple[int, ...]  # bucket index of tensor i

    def members(self, bucket: int) -> list[int]:
        """Indices of the tensors that live in ``bucket``."""
        return [i for i, b in enumerate(self.bucket_of) if b == bucket]


def layout(numels: Sequence[int], bucket_numel: int, pad_multiple: int = 1, units: Sequence[object] | None = None,
           last_bucket_numel: int | None = None) -> Layout:
    """Cut tensors, kept in order, into buckets of at most ``bucket_numel`` elements.

    Buckets are formed from the last tensor backwards, because backward produces the last
    layers' gradients first: the last bucket, reduced first, can be capped lower with
    ``last_bucket_numel`` so its reduction starts early. Consecutive tensors with the same
    ``units`` label (a module's weight and bias) share a bucket; a unit larger than the cap
    gets a bucket of its own. Each bucket's length is rounded up to ``pad_multiple`` (zero
    padding), so it splits evenly over ranks. A pure function of its arguments.
    """
    if bucket_numel < 1 or pad_multiple < 1:
        raise ValueError(f"bucket_numel={bucket_numel} and pad_multiple={pad_multiple} must be >= 1")
    if any(n < 0 for n in numels):
        raise ValueError(f"numels {list(numels)} has a negative entry")
    groups = groups_from_end(list(numels), list(units) if units is not None else list(range(len(numels))),
                              bucket_numel, last_bucket_numel or bucket_numel)
    offsets, buckets, bucket_of = [0] * len(numels), [], [0] * len(numels)
    pos = 0
    for b, members in enumerate(groups):
        start = pos
        for i in members:
            offsets[i], bucket_of[i] = pos, b
            pos += numels[i]
        pos = start + -(-(pos - start) // pad_multiple) * pad_multiple
        buckets.append((start, pos))
    return Layout(tuple(offsets), tuple(int(n) for n in numels), tuple(buckets), pos, tuple(bucket_of))


def concat_layouts(parts: Sequence[Layout]) -> Layout:
    """Layouts placed back to back in one index space (offsets and buckets shifted)."""
    offsets, numels, buckets, bucket_of, pos, nb = [], [], [], [], 0, 0
    for lay in parts:
        offsets += [o + pos for o in lay.offsets]
        numels += lay.numels
        buckets += [(s + pos, e + pos) for s, e in lay.buckets]
        bucket_of += [b + nb for b in lay.bucket_of]
        pos, nb = pos + lay.total, nb + len(lay.buckets)
    return Layout(tuple(offsets), tuple(numels), tuple(buckets), pos, tuple(bucket_of))


def groups_from_end(numels: list[int], units: list, cap: int, last_cap: int) -> list[list[int]]:
    """Tensor indices per bucket, in order; whole units, filled from the end."""
    chunks: list[list[int]] = []  # units, the last one first
    for i in reversed(range(len(numels))):
        if chunks and units[chunks[-1][0]] == units[i]:
            chunks[-1].insert(0, i)
        else:
            chunks.append([i])
    groups: list[list[int]] = [[]]
    size = 0
    for chunk in chunks:
        n = sum(numels[i] for i in chunk)
        limit = last_cap if len(groups) == 1 else cap
        if size > 0 and size + n > limit:
            groups.append([])
            size = 0
        groups[-1][:0] = chunk
        size += n
    return list(reversed(groups))


class FlatBuffer:
    """A flat tensor with one shaped view per member tensor (zero-filled unless ``zero=False``)."""

    def __init__(self, shapes: Sequence[torch.Size], lay: Layout, dtype: torch.dtype, device: torch.device | str,
                 zero: bool = True) -> None:
        self.layout = lay
        self.data = (torch.zeros if zero else torch.empty)(lay.total, dtype=dtype, device=device)
        self.views = [self.data[o:o + n].view(s) for o, n, s in zip(lay.offsets, lay.numels, shapes)]

    def padding(self, i: int) -> torch.Tensor:
        """The padding at the end of bucket ``i`` (after its last member), as a 1-D view."""
        start, end = self.layout.buckets[i]
        members = [o + n for o, n, b in zip(self.layout.offsets, self.layout.numels, self.layout.bucket_of) if b == i]
        return self.data[max(members, default=start):end]

    def bucket(self, i: int) -> torch.Tensor:
        """Bucket ``i`` as a 1-D view."""
        start, end = self.layout.buckets[i]
        return self.data[start:end]

    def copy_in(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` into their views (one fused copy over the list)."""
        torch._foreach_copy_(self.views, list(tensors))

    def allreduce(self, comm: Communicator, op: str = "mean", wire_dtype: torch.dtype | None = None) -> None:
        """Allreduce the whole buffer, one call per bucket, in bucket order on every rank."""
        for i in range(len(self.layout.buckets)):
            comm.allreduce(self.bucket(i), op, wire_dtype)


def allreduce_tensors(
    comm: Communicator, tensors: Sequence[torch.Tensor], op: str = "mean",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES, wire_dtype: torch.dtype | None = None,
) -> None:
    """Allreduce many loose tensors in place with one collective per bucket.

    All ranks pass tensors of the same shapes, dtype and order. Tensors are packed into a
    bucket, reduced, and copied back; use a :class:`FlatBuffer` to skip both copies.
    """
    if not tensors:
        return
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"allreduce_tensors got mixed dtypes {sorted(map(str, dtypes))}: call it once per dtype")
    lay = layout([t.numel() for t in tensors], max(1, bucket_bytes // tensors[0].element_size()))
    for b in range(len(lay.buckets)):
        group = [tensors[i] for i in lay.members(b)]
        flat = torch.cat([t.reshape(-1) for t in group])
        comm.allreduce(flat, op, wire_dtype)
        torch._foreach_copy_(group, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in group]), group)])
