"""In-memory redundancy: every shard, as of the last commit, also lives on a second rank.

Rank ``r`` keeps, with ``d`` the replica distance (1 unless the ranks span nodes, see
:func:`replica_distance`),

* a replica of rank ``r - d``'s shard as of the last commit, so a replacement for a lost
  ``r - d`` gets it from memory instead of a checkpoint;
* rank ``r - d``'s averaged gradient shard of the step in flight, and its clipping factor,
  which it replays onto the replica once the step commits (clipping, L2 decay and the
  update, as the owner did them);
* a way back to the last commit for its own shard, whatever point of the step a failure
  interrupted: a snapshot taken just before each update, unless its holder shares its host.

When a rank and its holder share a host they share memory instead of sending
(:mod:`distopt.collectives.window`): the owner reduces its gradient shard straight into a
window the holder replays from, and the holder keeps the replica in a window the owner
maps, so the owner needs no snapshot: an update it applied but that never committed is
undone by copying the replica back, which a dead holder's mapping still holds. Why that
is safe:

* the owner never writes its gradient window between its reduction and the commit, and
  reduces into it again only once the holder has replayed: the next reduction needs the
  holder's own gradients, which the holder sends after it replayed
  (:meth:`Redundancy.commit` runs before a step's first gradient leaves);
* the owner updates its shard only after the step's gradient-norm allreduce, which its
  holder joins only after replaying the last commit: a replica is never mid-replay while
  its owner's shard is ahead of the commit, and it replays a step only once that step
  committed, so after a failed step it holds exactly the last commit.

Across hosts the gradients travel with one ring shift and the owner keeps its snapshot.

Replaying the owner's exact update on the owner's exact inputs gives the owner's bits, so
recovery changes no bit of the result. At stage 0 every rank holds everything, so only
the snapshot is kept. A step commits when the controller has every rank's report; the
workers learn it from the next step's start (or from ``rollback``).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Hashable, Sequence

import torch

from distopt.collectives.window import carve, open_window

if TYPE_CHECKING:
    from distopt.optim.sharded import ShardedOptimizer


class RecoveryError(RuntimeError):
    """The state of the last commit cannot be rebuilt from memory (a shard and its replica
    were both lost). Restore from a checkpoint instead."""


class Redundancy:
    """The snapshot, replica and in-flight gradients of one rank (see the module docstring)."""

    def __init__(self, opt: "ShardedOptimizer", distance: int = 1, shared_memory: bool = True) -> None:
        self.opt, self.distance = opt, distance
        self.live_step = opt.step_count  # updates applied to the live shard
        self.sharded = opt.zero_stage >= 1 and opt.comm.world_size > 1
        sizes = [t.numel() for t in opt._p_shards]
        like = opt._params.data
        item = like.element_size()
        grads = replicas = None
        if self.sharded and shared_memory and like.device.type == "cpu":
            grads = open_window(opt.comm, sum(sizes) * item, -distance)  # a holder maps its owner's gradients
            if grads is not None:  # an owner maps its holder's replica
                replicas = open_window(opt.comm, Shard.buffer_bytes(opt), distance)
        self.shared = grads is not None and replicas is not None
        if self.shared:
            grads.mine.view(like.dtype).copy_(opt._g_flat)  # the optimizer reduces straight into the window
            opt._g_flat = grads.mine.view(like.dtype)
            opt._g_shards = list(opt._g_flat.split(sizes))
            self.pending = carve(grads.peer, like.dtype, sizes)
            self.replica = Shard.in_buffer(replicas.mine, opt)
            self._holder = Shard.in_buffer(replicas.peer, opt)  # this rank's committed shard, kept by its holder
            self._pending_flat = self.snapshot = None
        else:
            self.replica = Shard.like(opt._p_shards, opt.rule) if self.sharded else None
            self._holder = None
            self._pending_flat = torch.empty(sum(sizes), dtype=like.dtype, device=like.device) \
                if self.sharded else None
            self.pending = list(self._pending_flat.split(sizes)) if self.sharded else []
            self.snapshot = Shard.like(opt._p_shards, opt.rule)
        self.pending_step: int | None = None
        self.pending_scale = 1.0  # the clipping factor of the pending step
        self.replay_s = 0.0  # seconds replaying since the optimizer last reported them
        self._shift = None  # the in-flight send of this step's gradient shard
        self.reset_replica()

    @property
    def left(self) -> int:
        """The rank whose shard this rank replicates."""
        return (self.opt.comm.rank - self.distance) % self.opt.comm.world_size

    def reset_replica(self) -> None:
        """Take the left neighbour's shard from the (identical everywhere) parameters, zero state."""
        if not self.sharded:
            return
        ranges = self.opt.plan.ranges(self.left)
        torch._foreach_copy_(self.replica.params, [self.opt._params.data[s:e] for s, e in ranges])
        for field in self.replica.state:
            for t in field:
                t.zero_()
        self.replica.step = self.opt.step_count

    def load_full(self, full: dict) -> None:
        """After a full-state load: the replica is the left neighbour's slice of it, committed."""
        from distopt.optim.state_io import fill_shard
        self.live_step = self.opt.step_count
        self.pending_step = None
        if self.sharded:
            self.reset_replica()
            fill_shard(self.opt, full, self.left, self.replica.state)

    def before_update(self, step: int, scale: float) -> None:
        """Snapshot the committed shard and hand this step's gradient shard (clipped by
        ``scale`` in the update) to the replica's holder."""
        if self.sharded:
            if not self.shared:
                self._shift = self.opt.comm.shift(self.opt._g_flat, out=self._pending_flat, async_op=True,
                                                  distance=self.distance)
            self.pending_step, self.pending_scale = step, scale
        if self.snapshot is not None:
            self.snapshot.copy_from(self.opt._p_shards, self.opt.state, step - 1)

    def shipped(self) -> None:
        """Wait until the replica's holder has this step's gradient shard (across hosts)."""
        if self._shift is not None:
            self._shift, shift = None, self._shift
            shift.wait()

    def after_update(self, step: int) -> None:
        """Record that the live shard now holds update ``step``."""
        self.live_step = step

    def commit(self, committed: int) -> None:
        """Every rank finished update ``committed``: replay the neighbour's in-flight update."""
        if self.sharded and self.pending_step is not None and self.pending_step <= committed:
            t0 = time.perf_counter()
            if self.replica.step != self.pending_step - 1:
                raise RecoveryError(f"replica of rank {self.left} is at update {self.replica.step}, cannot replay "
                                    f"update {self.pending_step}")
            rule, step, rep = self.opt.rule, self.pending_step, self.replica
            grads = clipped(self.pending, self.pending_scale)
            rule.apply(rep.params, rule.prepare(rep.params, grads, step), rep.state, step)
            self.replica.step, self.pending_step = step, None
            self.replay_s += time.perf_counter() - t0

    def rollback(self, committed: int) -> None:
        """Return the live shard and the replica to update ``committed`` (a failed step is undone)."""
        self._shift = None  # its group is gone; a half-received gradient is never replayed
        if self.live_step == committed + 1:
            back = self.snapshot if self.snapshot is not None else self._holder
            if back.step == committed:
                back.copy_to(self.opt._p_shards, self.opt.state)
                self.live_step = committed
        if self.live_step != committed:
            raise RecoveryError(f"rank {self.opt.comm.rank} holds update {self.live_step} and cannot return to "
                                f"update {committed}")
        self.commit(committed)
        self.pending_step = None
        if self.sharded and self.replica.step != committed:
            raise RecoveryError(f"replica of rank {self.left} holds update {self.replica.step}, not {committed}")
        self.opt.step_count = committed

    def nbytes(self) -> int:
        """Memory this redundancy costs on this rank."""
        total = (self.snapshot.nbytes() if self.snapshot else 0) + (self.replica.nbytes() if self.replica else 0)
        return total + (self._pending_flat.numel() * self._pending_flat.element_size()
                        if self._pending_flat is not None else 0)


def clipped(grads: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """``grads`` times the clipping factor, as new tensors (the owner's buffer stays as
    reduced: its holder replays from it)."""
    return grads if scale == 1.0 else torch._foreach_mul(grads, scale)


def replica_distance(nodes: Sequence[Hashable]) -> tuple[int, list[int]]:
    """The distance ``d`` at which rank ``r + d`` holds rank ``r``'s replica, given each rank's
    node; and the ranks whose replica would still share their node.

    The smallest ``d`` that puts every replica on another node than its shard, so losing a
    whole node loses no shard together with its replica (ranks packed by node, ``k`` to a
    node, give ``d = k``). Where no ``d`` does that (one node, or one node holding more
    than half the ranks), the ``d`` that separates the most pairs, smallest first.
    """
    world = len(nodes)
    if world <= 1 or len(set(nodes)) == 1:
        return 1, list(range(world))

    def shared(d: int) -> list[int]:
        return [r for r in range(world) if nodes[r] == nodes[(r + d) % world]]
    best = min(range(1, world), key=lambda d: (len(shared(d)), d))
    return best, shared(best)


class Shard:
    """Parameters and state of one shard, as lists of per-bucket tensors.

    With a ``header`` (a one-element int64 tensor, in shared memory) the step lives there,
    so another process that maps it reads the step along with the tensors.
    """

    def __init__(self, params: list[torch.Tensor], state, step: int | None,
                 header: torch.Tensor | None = None) -> None:
        self.params, self.state, self._header = params, state, header
        if step is not None:  # None: the header already holds the step (its writer is another process)
            self.step = step

    @property
    def step(self) -> int:
        return int(self._header[0]) if self._header is not None else self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = value
        if self._header is not None:
            self._header[0] = value

    @classmethod
    def like(cls, params: list[torch.Tensor], rule) -> "Shard":
        return cls([torch.empty_like(p) for p in params], rule.init(params), -1)

    @staticmethod
    def buffer_bytes(opt: "ShardedOptimizer") -> int:
        """Bytes :meth:`in_buffer` lays a shard of ``opt`` out in."""
        fields = 1 + sum(1 for f in opt.rule.init([torch.zeros(1)]) if f)  # parameters and each state field
        return 8 + fields * sum(t.numel() for t in opt._p_shards) * opt._params.data.element_size()

    @classmethod
    def in_buffer(cls, buf: torch.Tensor, opt: "ShardedOptimizer") -> "Shard":
        """A shard shaped like ``opt``'s, laid out in the bytes ``buf``: the step (8 bytes),
        the parameters, then each state field the rule keeps."""
        sizes = [t.numel() for t in opt._p_shards]
        template = opt.rule.init([torch.zeros(1)])
        fields = 1 + sum(1 for f in template if f)
        views = carve(buf, opt._params.data.dtype, sizes * fields, offset=8)
        parts = iter(views[i * len(sizes):(i + 1) * len(sizes)] for i in range(fields))
        params = next(parts)
        state = type(template)(*[next(parts) if f else [] for f in template])
        return cls(params, state, None, header=buf[:8].view(torch.int64))

    def copy_from(self, params: list[torch.Tensor], state, step: int) -> None:
        torch._foreach_copy_(self.params, params)
        for mine, theirs in zip(self.state, state):
            if mine:
                torch._foreach_copy_(mine, theirs)
        self.step = step

    def copy_to(self, params: list[torch.Tensor], state) -> None:
        torch._foreach_copy_(params, self.params)
        for mine, theirs in zip(self.state, state):
            if mine:
                torch._foreach_copy_(theirs, mine)

    def packet(self) -> torch.Tensor:
        """Parameters then each state field, flattened into one tensor (for a broadcast)."""
        parts = [t.reshape(-1) for t in self.params] + [t.reshape(-1) for f in self.state for t in f]
        return torch.cat(parts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params) + \
            sum(t.numel() * t.element_size() for f in self.state for t in f)
