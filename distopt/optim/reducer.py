"""Gradients into buckets, and bucket reductions started while backward still runs.

A hook after each parameter's gradient accumulation counts its bucket down; a full bucket
starts its reduction at once (asynchronously) if every bucket before it in the launch
order has started, so every rank issues the same collectives in the same order. A bucket
holding a parameter that got no gradient holds back itself and every bucket after it until
``step`` (as DDP without ``find_unused_parameters``): correct, not overlapped.

Where gradients live:

* kept (zero_stage 0 and 1): ``.grad`` is a view of the gradient bucket, so autograd
  accumulates straight into bucket memory (DDP's ``gradient_as_bucket_view``); a ``.grad``
  replaced by the user (set to None, or a new tensor) is copied back once, at its hook.
* not kept (zero_stage 2): autograd accumulates into ``.grad`` per parameter as usual; a full
  bucket is packed into one of ``POOL`` bucket-sized buffers, its ``.grad`` tensors dropped,
  and reduce-scattered into this rank's shard. So at most the gradients of the buckets
  backward is filling plus ``POOL`` packed buckets exist at once.

At most ``POOL`` reductions are in flight: a launch past that first waits for the oldest,
since each holds a bucket's worth of receive buffers in the communicator. At zero_stage 2
that wait also frees the packing buffer the launch takes (its last user is that reduction or
an older one).

Under :meth:`no_sync` (gradient accumulation) the hooks only let gradients accumulate;
the backward after it reduces. Called by :class:`~distopt.optim.ShardedOptimizer` only.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from distopt.optim.flat import Flat

POOL = 2  # reductions in flight at once (and packed gradient buckets at zero_stage 2)


class Reducer:
    """One step's bookkeeping: which buckets are full, started, and which buffers they use."""

    def __init__(self, opt) -> None:
        self.opt = opt
        lay = opt.plan.layout
        self.members = [lay.members(b) for b in range(len(lay.buckets))]
        self.gaps = [_gaps(lay, b, m) for b, m in enumerate(self.members)]
        self.order = opt.arrangement.launch
        self.sync = True
        self.narrow_blocks = False  # set by the optimizer: a narrowed stage-0 allreduce blocks
        self._pool: dict[torch.dtype, list[torch.Tensor]] = {}  # per dtype: up to POOL packing buffers
        self._turn: dict[torch.dtype, int] = {}
        self._reset()
        self.handles = [t.register_post_accumulate_grad_hook(self._hook(i)) for i, t in enumerate(opt.tensors)]

    def _reset(self) -> None:
        self.left = [len(m) for m in self.members]
        self.ready: set[int] = set()
        self.started = [False] * len(self.members)
        self.next = 0
        self.pending: list = []
        self._done = 0  # reductions of ``pending`` waited for

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients without reducing them."""
        before, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = before

    def _hook(self, i: int):
        def on_grad(t: torch.Tensor) -> None:
            if self.sync:
                self._ready(i)
        return on_grad

    def _ready(self, i: int) -> None:
        b = self.opt.plan.layout.bucket_of[i]
        if self.started[b]:
            raise RuntimeError(f"the gradient of {self.opt.names[i]!r} arrived after its bucket was reduced: run "
                               f"every backward but the last of a step under `with opt.no_sync():`, then step()")
        self.left[b] -= 1
        if self.left[b] == 0:
            self.ready.add(b)
            if not self.narrow_blocks:
                self._launch_ready(None)

    def _launch_ready(self, given: Sequence[torch.Tensor] | None) -> None:
        while self.next < len(self.order) and self.order[self.next] in self.ready:
            self._launch(self.order[self.next], given)
            self.next += 1

    def finish(self, given: Sequence[torch.Tensor] | None = None) -> None:
        """In ``step``: start what backward left (unused parameters, gradients set by hand,
        ``given`` gradients in plan order), then wait for every reduction."""
        if given is not None and self.next > 0:
            raise RuntimeError("step(grads=...) after a backward that already reduced gradients: use one or the other")
        self.ready = set(range(len(self.members)))
        self._launch_ready(given)
        for p in self.pending:
            p.wait()
        self._reset()

    def _launch(self, b: int, given: Sequence[torch.Tensor] | None) -> None:
        opt = self.opt
        while len(self.pending) - self._done >= POOL:  # each reduction in flight holds bucket-sized scratch
            self.pending[self._done].wait()
            self._done += 1
        grads: Flat | None = opt.grad_buckets
        if grads is not None:
            views = [grads.views[i] for i in self.members[b]]
            flat = grads.bucket(b)
        else:
            flat = self._buffer(b)
            views = _member_views(flat, opt.plan.layout, b, self.members[b], opt.tensors)
            for lo, hi in self.gaps[b]:  # padding: reduced, and summed into the gradient norm
                flat[lo:hi].zero_()
        for i, view in zip(self.members[b], views):
            t = opt.tensors[i]
            g = given[i] if given is not None else t.grad
            if g is None:
                view.zero_()  # no gradient reached it this step
            elif g.data_ptr() != view.data_ptr() or g.shape != view.shape:
                view.copy_(g)
            if grads is not None:
                t.grad = view
            else:
                t.grad = None  # packed: the per-parameter gradient goes
        self.started[b] = True
        self.pending.append(opt.reduce_bucket(b, flat))

    def _buffer(self, b: int) -> torch.Tensor:
        """The packing buffer of bucket ``b``: the dtype's buffers taken in turn (free: see the
        module docstring)."""
        dtype = self.opt.arrangement.bucket_dtype[b]
        start, end = self.opt.plan.layout.buckets[b]
        slots = self._pool.setdefault(dtype, [])
        if len(slots) < POOL:
            need = max(e - s for (s, e), d in zip(self.opt.plan.layout.buckets, self.opt.arrangement.bucket_dtype)
                       if d == dtype)
            slots.append(torch.empty(need, dtype=dtype, device=self.opt.device))
        self._turn[dtype] = turn = self._turn.get(dtype, -1) + 1
        return slots[turn % len(slots)][: end - start]

    def packing_bytes(self) -> int:
        """Bytes of the packing buffers (zero_stage 2), at most ``POOL`` buckets per dtype."""
        return sum(buf.numel() * buf.element_size() for slots in self._pool.values() for buf in slots)

    def close(self) -> None:
        """Remove the hooks (the optimizer is being replaced)."""
        for h in self.handles:
            h.remove()
        self.handles = []


def _member_views(flat: torch.Tensor, lay, b: int, members: list[int], tensors) -> list[torch.Tensor]:
    start = lay.buckets[b][0]
    return [flat[lay.offsets[i] - start: lay.offsets[i] - start + lay.numels[i]].view(tensors[i].shape)
            for i in members]


def _gaps(lay, b: int, members: list[int]) -> list[tuple[int, int]]:
    """The ``[lo, hi)`` ranges of bucket ``b`` (bucket-relative) that no member covers."""
    start, end = lay.buckets[b]
    out, pos = [], 0
    for lo, n in sorted((lay.offsets[i] - start, lay.numels[i]) for i in members):
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, lo + n)
    return out + ([(pos, end - start)] if pos < end - start else [])
