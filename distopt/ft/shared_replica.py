"""A replica kept in its owner's shared memory, for ranks that share a host.

Every rank ``r`` has one window (a file in ``/dev/shm``, :mod:`distopt.collectives.window`)
that its holder ``r + d`` maps too. It holds

* a header: the update the replica holds, the update whose gradients are logged, and that
  update's clipping factor;
* ``r``'s averaged gradient shard: the optimizer reduces each step's gradients straight
  into it (no copy);
* the replica of ``r``'s shard (parameters and each state field its rules keep) as of the
  last commit. The holder writes it: when update ``c`` commits it replays ``c`` on it from
  ``r``'s logged gradients and clipping factor, as ``r`` did them (same bits).

So both ranks reach the replica, whichever of them dies: the holder gives a replacement
for a lost ``r`` its shard, and ``r`` undoes an update that never committed (its holder
alive or not) by copying the replica back, with no copy of its own. The memory per element
of a rank's shard is the replica it writes for its left neighbour (12 bytes for fp32 Adam)
and, below zero_stage 2, the gradient shard beside the full gradient buckets (4 bytes);
at stage 2 that shard is the one every rank has anyway. A rank touches its own replica only
to undo an update.

Why the holder's reads are never torn: ``r`` writes its gradient shard only through the
reduce-scatter of its next step, whose result it assembles once every peer has sent its
part, the holder included; the holder replays update ``c`` when it learns that ``c``
committed, at the start of its step ``c + 1``, before it sends any part of that step's
reduction. ``r`` reads its replica only after a failure, when it holds an update past the
commit: it then passed that reduction, so the replica holds the commit.

The replay runs on the training thread, when the commit arrives: with the thread pool the
step has (a background thread beside the forward pass measured no faster on CPUs the ranks
keep busy, and made two thread teams share the cores; ``benchmarks/NOTES.md``).
"""
from __future__ import annotations

import torch

from distopt.collectives.window import Window, carve, open_window
from distopt.ft.errors import RecoveryError
from distopt.ft.shard import Shard
from distopt.optim.sharded import ShardedOptimizer

_HEAD = 64  # bytes: replica's update, logged gradients' update (int64), their clipping factor (float64)


class _Area:
    """One rank's window: header, gradient shard and replica (per-bucket views)."""

    def __init__(self, buf: torch.Tensor, lay: "_Layout") -> None:
        self.steps = buf[:16].view(torch.int64)  # [update the replica holds, update of the logged gradients]
        self.scale = buf[16:24].view(torch.float64)
        n, item = sum(lay.sizes), lay.dtype.itemsize
        self.grad = carve(buf, lay.dtype, [n], offset=_HEAD)[0]
        self.grads = list(self.grad.split(lay.sizes))
        offset, state = _HEAD + 2 * n * item, {}
        for k, name in enumerate(lay.names):
            sizes = [n_b if kept[k] else 0 for n_b, kept in zip(lay.sizes, lay.kept)]
            state[name] = carve(buf, lay.dtype, sizes, offset=offset)
            offset += sum(sizes) * item
        # (Its ``step`` is this process's; the one both ranks trust is ``steps[0]``.)
        self.replica = Shard(carve(buf, lay.dtype, lay.sizes, offset=_HEAD + n * item), state, -1)

    @property
    def replica_step(self) -> int:
        return int(self.steps[0])


class _Layout:
    """One shard's bucket sizes, dtype and, per bucket, the state fields its rule keeps."""

    def __init__(self, opt: ShardedOptimizer) -> None:
        self.sizes = [t.numel() for t in opt.shard_params]
        self.dtype = opt.params_flat.data.dtype
        self.names = list(opt.shard_state)
        self.kept = [[f in opt.rules.bucket_fields[b] for f in self.names] for b in range(len(self.sizes))]

    def nbytes(self) -> int:
        per_field = [sum(n for n, kept in zip(self.sizes, self.kept) if kept[k]) for k in range(len(self.names))]
        return _HEAD + (2 * sum(self.sizes) + sum(per_field)) * self.dtype.itemsize


class SharedReplica:
    """This rank's side of the shared-memory redundancy (see the module docstring): its own
    window (gradients it logs, the replica its holder keeps of it) and its left neighbour's
    (whose replica this rank keeps)."""

    def __init__(self, opt: ShardedOptimizer, window: Window, lay: _Layout, distance: int) -> None:
        self.opt, self.lay = opt, lay
        self.left_rank = (opt.comm.rank - distance) % opt.comm.world_size
        self.own = _Area(window.mine, lay)
        self.left = _Area(window.peer, lay)

    @classmethod
    def open(cls, opt: ShardedOptimizer, distance: int) -> "SharedReplica | None":
        """Map this rank's window and its left neighbour's (a collective); None on every rank
        if any rank cannot."""
        lay = _Layout(opt)
        window = open_window(opt.comm, lay.nbytes(), -distance)
        return cls(opt, window, lay, distance) if window is not None else None

    # --- every step ----------------------------------------------------------------
    def bind(self) -> None:
        """Reduce this rank's gradients into its window."""
        self.opt.use_grad_shards(self.own.grad)

    def record(self, step: int, scale: float) -> None:
        """Log that the gradients in the window are update ``step``'s, clipped by ``scale``."""
        self.own.scale[0], self.own.steps[1] = scale, step

    def commit(self, committed: int) -> None:
        """Update ``committed`` has committed everywhere: replay it on the left neighbour's
        replica (nothing to do when the replica already holds it)."""
        if self.left.replica_step == committed:
            return
        self._check_logged(committed)
        area = self.left
        area.replica.replay(self.opt, committed, area.grads, float(area.scale[0]), self.left_rank)
        area.steps[0] = committed  # after the replay: a holder killed mid-replay leaves the old number

    def _check_logged(self, step: int) -> None:
        have, logged = self.left.replica_step, int(self.left.steps[1])
        if have != step - 1 or logged != step:
            raise RecoveryError(f"replica of rank {self.left_rank} holds update {have} and its logged gradients are "
                                f"update {logged}: cannot replay update {step}")

    # --- set-up and recovery -------------------------------------------------------
    def reset(self, step: int, full: dict | None = None) -> None:
        """The left neighbour's replica at ``step``: its slice of the parameters (the same on
        every rank) with zero state, or with its slice of the full state dict ``full`` that
        every rank just loaded."""
        self.left.steps[0] = -1  # a rank killed below leaves no replica that looks complete
        self.left.replica.fill(self.opt, self.left_rank, full)
        self.left.steps[0] = self.left.replica.step = step
        self.bind()

    def replica(self, committed: int) -> Shard:
        """The left neighbour's shard at ``committed`` (views of its window)."""
        self.commit(committed)
        self.left.replica.step = committed
        return self.left.replica

    def undo(self, committed: int) -> None:
        """Return this rank's live shard to ``committed`` from the replica its holder keeps."""
        have = self.own.replica_step
        if have != committed:
            raise RecoveryError(f"rank {self.opt.comm.rank}'s replica holds update {have}, not the commit "
                                f"{committed}: it cannot undo its update")
        self.own.replica.copy_to(self.opt.shard_params, self.opt.shard_state)

    def nbytes(self) -> int:
        """Memory this rank's redundancy touches beyond what it has without: the replica it
        writes, and below zero_stage 2 its gradient shard beside the gradient buckets."""
        item = self.lay.dtype.itemsize
        replica = self.lay.nbytes() - _HEAD - sum(self.lay.sizes) * item
        return replica + (sum(self.lay.sizes) * item if self.opt.grad_buckets is not None else 0)
