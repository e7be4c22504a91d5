"""Reducing gradient buckets while backward is still running.

Hooks on the parameters copy each gradient into its bucket as autograd produces it; a
bucket whose gradients are all in starts its reduction at once (asynchronously), so the
communication of the last layers overlaps the backward of the first ones. Buckets are
launched in descending index order on every rank (backward fills the last buckets
first), so every rank issues the same collectives in the same order. A bucket holding a
parameter that gets no gradient holds back itself and every bucket after it in that
order until ``step`` (as DDP without ``find_unused_parameters``): correct, not overlapped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distopt.collectives.buckets import FlatBuffer

if TYPE_CHECKING:
    from distopt.optim.sharded import ShardedOptimizer


class Overlap:
    """Per-step bookkeeping of which buckets are full and which reductions are in flight."""

    def __init__(self, opt: "ShardedOptimizer") -> None:
        self.opt = opt
        lay = opt.plan.layout
        self.members = [lay.members(b) for b in range(len(lay.buckets))]
        self.handles = [t.register_hook(self._hook(i)) for i, t in enumerate(opt._tensors)]
        self.capturing = False
        self.fresh = False  # the buffer was allocated this step without zeroing
        self.last, self.scale = True, 1.0
        self.written: list[bool] = []
        self.left: list[int] = []
        self.ready: set[int] = set()
        self.next_launch = -1
        self.pending: list = []

    def begin(self, first: bool, last: bool, scale: float) -> None:
        """Before a micro-batch's backward: ``first`` of the step, ``last`` to reduce after it."""
        opt = self.opt
        if first:
            if opt.redundancy is not None:  # before this step's first gradient leaves (see redundancy)
                opt.redundancy.commit(opt.step_count)
            if opt._grads is None:  # stage 2 keeps a full-size buffer only while a step runs
                opt._grads = FlatBuffer([t.shape for t in opt._tensors], opt.plan.layout,
                                        opt._params.data.dtype, opt._params.data.device, zero=False)
                self.fresh = True  # padding and unwritten members are zeroed at launch
            self.written = [False] * len(opt._tensors)
            self.pending, self.ready = [], set()
            self.next_launch = len(self.members) - 1
        self.capturing, self.last, self.scale = True, last, scale
        self.left = [len(m) for m in self.members]

    def _hook(self, i: int):
        def on_grad(grad: torch.Tensor) -> None:
            if self.capturing:
                self._take(i, grad)
        return on_grad

    def _take(self, i: int, grad: torch.Tensor) -> None:
        view = self.opt._grads.views[i]
        if not self.written[i]:
            torch.mul(grad, self.scale, out=view) if self.scale != 1.0 else view.copy_(grad)
            self.written[i] = True
        else:
            view.add_(grad, alpha=self.scale)
        if self.last:
            b = self.opt.plan.layout.bucket_of[i]
            self.left[b] -= 1
            if self.left[b] == 0:
                self.ready.add(b)
                self._launch_ready()

    def _launch_ready(self) -> None:
        opt = self.opt
        if opt.zero_stage == 0 and opt.wire_dtype not in (None, opt._params.data.dtype):
            # A narrowed allreduce blocks (its gather follows its exchange), and a hook
            # must not: ranks sharing one GPU share its autograd thread. Left for step.
            return
        while self.next_launch >= 0 and self.next_launch in self.ready:
            self._launch(self.next_launch)
            self.next_launch -= 1

    def _launch(self, b: int) -> None:
        opt = self.opt
        for i in self.members[b]:
            if not self.written[i]:  # no gradient reached it this step
                opt._grads.views[i].zero_()
        if self.fresh:
            opt._grads.padding(b).zero_()
        bucket = opt._grads.bucket(b)
        if opt.zero_stage == 0:
            self.pending.append(opt.comm.allreduce(bucket, "mean", opt.wire_dtype, async_op=True))
        else:
            self.pending.append(opt.comm.reduce_scatter(bucket, "mean", opt.wire_dtype, out=opt._g_shards[b],
                                                        async_op=True))

    def close(self) -> None:
        """Remove the hooks (the optimizer is being replaced)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def finish(self) -> None:
        """In ``step``: launch what backward left (unused parameters), wait for every bucket."""
        self.capturing = False
        while self.next_launch >= 0:
            self._launch(self.next_launch)
            self.next_launch -= 1
        for p in self.pending:
            p.wait()
        self.pending = []
        if self.opt.zero_stage == 2:
            self.opt._grads, self.fresh = None, False
