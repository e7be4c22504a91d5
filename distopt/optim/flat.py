"""Flat buffers laid out by a plan: one tensor per dtype, each bucket a slice of its dtype's.

The plan puts every dtype's buckets back to back (:func:`distopt.optim.plan.arrange`), so a
dtype's buckets cover one contiguous range of the plan and live in one tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch

from distopt.optim.plan import Arrangement, ShardPlan


class Flat:
    """Per-dtype flat tensors holding every bucket, and a shaped view per tensor of the plan."""

    def __init__(self, plan: ShardPlan, arr: Arrangement, shapes: Sequence[torch.Size], device: torch.device,
                 zero: bool = True) -> None:
        lay = plan.layout
        self.segments: list[tuple[torch.dtype, int, torch.Tensor]] = []  # dtype, plan start, tensor
        self._buckets: list[torch.Tensor] = []
        for b, (start, end) in enumerate(lay.buckets):
            dtype = arr.bucket_dtype[b]
            if not self.segments or self.segments[-1][0] != dtype:
                stop = max(e for (s, e), d in zip(lay.buckets, arr.bucket_dtype) if d == dtype)
                alloc = torch.zeros if zero else torch.empty
                self.segments.append((dtype, start, alloc(stop - start, dtype=dtype, device=device)))
            _, base, flat = self.segments[-1]
            self._buckets.append(flat[start - base:end - base])
        self.views = [self._at(o, n).view(s) for o, n, s in zip(lay.offsets, lay.numels, shapes)]

    def _at(self, offset: int, numel: int) -> torch.Tensor:
        for _, base, flat in reversed(self.segments):
            if offset >= base:
                return flat[offset - base:offset - base + numel]
        raise IndexError(offset)

    @property
    def data(self) -> torch.Tensor:
        """The one flat tensor, where every parameter has one dtype.

        Raises:
            TypeError: the parameters mix dtypes (use :attr:`segments`).
        """
        if len(self.segments) != 1:
            raise TypeError(f"the parameters mix dtypes {[str(d) for d, _, _ in self.segments]}: checkpoints and "
                            f"fault tolerance keep one flat copy of a shard and do not cover mixed dtypes yet; cast "
                            f"the model to one dtype (model.float()), or train without them (max_failures=0, "
                            f"checkpoint_dir=None)")
        return self.segments[0][2]

    def bucket(self, b: int) -> torch.Tensor:
        """Bucket ``b`` as a 1-D view."""
        return self._buckets[b]

    def range(self, start: int, end: int) -> torch.Tensor:
        """Plan positions ``[start, end)`` (within one dtype) as a 1-D view."""
        return self._at(start, end - start)

    def flats(self) -> list[torch.Tensor]:
        """Each dtype's flat tensor."""
        return [flat for _, _, flat in self.segments]


def shard_views(ranges: Sequence[tuple[int, int]], dtypes: Sequence[torch.dtype],
                device: torch.device) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Zeroed per-bucket shards of the sizes of ``ranges``, packed in one flat tensor per
    dtype; that flat tensor too where there is one dtype (else None)."""
    flats = {d: torch.zeros(sum(e - s for (s, e), x in zip(ranges, dtypes) if x == d), dtype=d, device=device)
             for d in dict.fromkeys(dtypes)}
    shards, used = [], {d: 0 for d in flats}
    for (s, e), d in zip(ranges, dtypes):
        shards.append(flats[d][used[d]:used[d] + e - s])
        used[d] += e - s
    return (next(iter(flats.values())) if len(flats) == 1 else None), shards


def adopt_params(tensors: Sequence[torch.Tensor], plan: ShardPlan, arr: Arrangement, device: torch.device) -> Flat:
    """A :class:`Flat` holding copies of ``tensors``, each re-pointed at its view: the same
    tensor objects, so the model sees every update made in the flat buffer."""
    buf = Flat(plan, arr, [t.shape for t in tensors], device)
    with torch.no_grad():
        torch._foreach_copy_(buf.views, [t.detach() for t in tensors])
    for t, view in zip(tensors, buf.views):
        t.data = view
    return buf


def adopt_grads(tensors: Sequence[torch.Tensor], plan: ShardPlan, arr: Arrangement, device: torch.device) -> Flat:
    """A :class:`Flat` of gradient buckets holding ``tensors``' gradients so far, each
    ``.grad`` re-pointed at its view: backward accumulates straight into the bucket."""
    buf = Flat(plan, arr, [t.shape for t in tensors], device)
    for t, view in zip(tensors, buf.views):
        if t.grad is not None:
            view.copy_(t.grad)
        t.grad = view
    return buf
