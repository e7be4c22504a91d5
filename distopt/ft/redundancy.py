"""In-memory redundancy: every shard, as of the last commit, also lives on a second rank.

Rank ``r + d`` (``d`` the replica distance: 1 unless the ranks span nodes, see
:func:`replica_distance`) keeps a replica of rank ``r``'s shard as of the last commit, so
a replacement for a lost ``r`` gets it from memory instead of a checkpoint; and each rank
can return its own shard to the last commit, whatever point of the step a failure
interrupted.

On one host (CPU) the replica lives in ``r``'s shared memory, where both ranks reach it
(:mod:`distopt.ft.shared_replica`): the holder replays ``r``'s committed update on it from
the gradients ``r`` reduced there, and ``r`` undoes an update that never committed by
copying it back. Per element of a shard that costs the replica (12 bytes for fp32 Adam)
and one replay of the neighbour's update per step, when the commit arrives.

Across hosts the holder receives ``r``'s averaged gradient shard of the step in flight
with one ring shift, with its clipping factor, and replays it onto its private replica
once the step commits. To undo its own update a rank on CPU keeps copies of its shard and
a log of its gradients (:mod:`distopt.ft.replica_log`, a copy of ``1/depth`` of the shard
per step); on a GPU it snapshots its shard before each update (a device copy).

Replaying the owner's exact update on the owner's exact inputs gives the owner's bits, so
recovery changes no bit of the result. At stage 0 every rank holds everything, so only
the snapshot is kept. A step commits when the controller has every rank's report; the
worker then says so with :meth:`Redundancy.commit`, or undoes the step with
:meth:`Redundancy.rollback`. The layer sees the optimizer only through its public fields
and the step hooks (:mod:`distopt.optim.hooks`).
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

from distopt.ft.errors import RecoveryError
from distopt.ft.replica_log import DEPTH, ReplicaLog, check_depth
from distopt.ft.shard import Shard
from distopt.ft.shared_replica import SharedReplica
from distopt.optim.hooks import StepHooks
from distopt.optim.sharded import ShardedOptimizer


class Redundancy(StepHooks):
    """The replica and the means to undo of one rank (see the module docstring).

    Args:
        opt: the optimizer to watch; the redundancy registers its hooks on it.
        distance: rank ``r + distance`` holds rank ``r``'s replica (:func:`replica_distance`).
        shared_memory: ranks that share a host keep the replicas in shared memory
            (:mod:`distopt.collectives.window`) instead of sending gradients; the same on every rank.
        log_depth: across hosts on CPU, the steps over which a rank copies its own shard
            to undo its update (:mod:`distopt.ft.replica_log`).

    Construction is a collective (the replicas start from the parameters, the windows are
    mapped by every rank).

    Raises:
        ValueError: a bad ``distance`` or ``log_depth``.
        TypeError: the optimizer's parameters mix dtypes (not covered yet).
    """

    def __init__(self, opt: ShardedOptimizer, distance: int = 1, shared_memory: bool = True,
                 log_depth: int = DEPTH) -> None:
        world = opt.comm.world_size
        if not isinstance(distance, int) or isinstance(distance, bool) or not 1 <= distance <= max(1, world - 1):
            raise ValueError(f"replica_distance={distance!r} must be an int in [1, world_size - 1] "
                             f"(world_size={world}): use distopt.ft.replica_distance(nodes)")
        check_depth(log_depth)
        if len(opt.params_flat.segments) > 1:
            raise TypeError("fault tolerance keeps one flat copy per shard and does not cover parameters of mixed "
                            "dtypes yet: cast the model to one dtype, or train with max_failures=0")
        self.opt, self.distance = opt, distance
        self.live_step = opt.step_count  # updates applied to the live shard
        self.sharded = opt.plan.world_size > 1
        like = opt.params_flat.data
        cpu = like.device.type == "cpu"
        self.window = SharedReplica.open(opt, distance) if self.sharded and shared_memory and cpu else None
        self.shared = self.window is not None
        across = self.sharded and not self.shared
        self.replica = Shard.like(opt.shard_params, opt) if across else None
        sizes = [t.numel() for t in opt.shard_params]
        self._pending_flat = torch.empty(sum(sizes), dtype=like.dtype, device=like.device) if across else None
        self.pending = list(self._pending_flat.split(sizes)) if across else []
        if across:  # the shift sends the gradient shard as one flat tensor
            opt.use_grad_shards(torch.zeros(sum(sizes), dtype=like.dtype, device=like.device))
        # Across hosts on CPU the rank keeps copies of its own shard and a log (a copy of
        # 1/depth of the shard per step); unsharded or on a GPU a snapshot of the whole
        # shard before each update, which on a GPU is a device copy.
        self.own_log = ReplicaLog.local(opt, log_depth) if across and cpu else None
        self.snapshot = None if self.shared or self.own_log else Shard.like(opt.shard_params, opt)
        self.pending_step: int | None = None
        self.pending_scale = 1.0  # the clipping factor of the pending step
        self._shift = None  # the in-flight send of this step's gradient shard
        self.reset_replica()
        self.remove = opt.register_hooks(self)

    @property
    def left(self) -> int:
        """The rank whose shard this rank replicates."""
        return (self.opt.comm.rank - self.distance) % self.opt.comm.world_size

    def reset_replica(self, full: dict | None = None) -> None:
        """Start the redundancy afresh: the left neighbour's replica is its slice of the
        parameters (identical everywhere) with zero state, or with its slice of the full
        state dict ``full`` just loaded; across hosts on CPU this rank's copies of its own shard too."""
        if self.shared:
            self.window.reset(self.opt.step_count, full)
        if self.replica is None:
            return
        if self.own_log is not None:
            self.own_log.reset(self.opt.step_count)
        self.replica.fill(self.opt, self.left, full)
        self.replica.step = self.opt.step_count

    def load_full(self, full: dict) -> None:
        """After a full-state load: the replica is the left neighbour's slice of it, committed."""
        self.live_step = self.opt.step_count
        self.pending_step = None
        self.reset_replica(full)

    def before_load(self, full: bool) -> None:
        """Hook: refuse a shard state dict where the state is sharded: a rank's own shard
        cannot rebuild the replica its neighbour keeps of it, so a later recovery would bring
        back the state from before the load."""
        if not full and self.sharded:
            raise ValueError("load_state_dict cannot rebuild the in-memory redundancy (fault tolerance on, "
                             "zero_stage >= 1): load a full_state_dict() with load_full_state_dict() on every rank")

    def after_load(self, full_state: dict | None) -> None:
        """Hook: a full state dict was loaded: rebuild the replicas from it."""
        if full_state is not None:
            self.load_full(full_state)

    def grads_reduced(self, step: int) -> None:
        """Hook: finish the background copies before the gradient-norm allreduce, so before
        the update that changes the shard they read (see :meth:`settle`)."""
        self.settle()

    def before_update(self, step: int, scale: float) -> None:
        """Log this step's gradient shard and clipping factor for the replica's holder (on one
        host), or send them to it (across hosts); snapshot the shard where that is the undo."""
        if self.shared:
            self.window.record(step, scale)
        elif self.sharded:
            if self.own_log is not None:
                self.own_log.record(step, scale)
            self._shift = self.opt.comm.shift(self.opt.grad_flat, out=self._pending_flat, async_op=True,
                                              distance=self.distance)
            self.pending_step, self.pending_scale = step, scale
        if self.snapshot is not None:
            self.snapshot.copy_from(self.opt.shard_params, self.opt.shard_state, step - 1)

    def after_update(self, step: int) -> None:
        """Record that the live shard now holds update ``step``."""
        self.live_step = step

    def after_gather(self, step: int) -> None:
        """Hook: the step is not done before the neighbour has our gradients; then start
        this rank's copies of update ``step`` (across hosts on CPU)."""
        if self._shift is not None:
            self._shift, shift = None, self._shift
            shift.wait()
        if self.own_log is not None:
            self.own_log.copy_ahead(step)

    def settle(self) -> None:
        """Finish the copies running beside the step (across hosts on CPU); before anything
        reads or changes what they use."""
        if self.own_log is not None:
            self.own_log.settle()

    def commit(self, committed: int) -> None:
        """Every rank finished update ``committed``: replay the neighbour's update on its
        replica."""
        if self.shared:
            self.window.commit(committed)
            return
        if self.own_log is not None:
            self.own_log.refresh(committed)
            self.own_log.bind(committed)
        if self.pending_step is not None and self.pending_step <= committed:
            if self.replica.step != self.pending_step - 1:
                raise RecoveryError(f"replica of rank {self.left} is at update {self.replica.step}, cannot replay "
                                    f"update {self.pending_step}")
            self.replica.replay(self.opt, self.pending_step, self.pending, self.pending_scale, self.left)
            self.pending_step = None

    def rollback(self, committed: int) -> None:
        """Return the live shard and the replica to update ``committed`` (a failed step is
        undone); local, no communication. The other ranks' parameter shards are restored by
        the recovery's gather.

        Raises:
            RecoveryError: this rank cannot return to ``committed``.
        """
        self.opt.notify_write()
        self._shift = None  # its group is gone; a half-received gradient is never replayed
        self.settle()
        if self.live_step == committed + 1:
            if self.shared:
                self.window.undo(committed)
                self.live_step = committed
            elif self.own_log is not None:
                self.own_log.undo(committed)
                self.live_step = committed
            elif self.snapshot.step == committed:
                self.snapshot.copy_to(self.opt.shard_params, self.opt.shard_state)
                self.live_step = committed
        if self.live_step != committed:
            raise RecoveryError(f"rank {self.opt.comm.rank} holds update {self.live_step} and cannot return to "
                                f"update {committed}")
        if self.replica is not None:
            self.commit(committed)
            self.pending_step = None
            if self.replica.step != committed:
                raise RecoveryError(f"replica of rank {self.left} holds update {self.replica.step}, not {committed}")
        self.opt.step_count = committed

    def replica_at_commit(self) -> "Shard":
        """The left neighbour's shard as of the last commit."""
        if self.shared:
            return self.window.replica(self.opt.step_count)
        self.commit(self.opt.step_count)
        return self.replica

    def nbytes(self) -> int:
        """Memory this redundancy costs on this rank."""
        if self.shared:
            return self.window.nbytes()
        total = (self.snapshot.nbytes() if self.snapshot else 0) + (self.replica.nbytes() if self.replica else 0) \
            + (self.own_log.nbytes() if self.own_log else 0)
        return total + (self._pending_flat.numel() * self._pending_flat.element_size()
                        if self._pending_flat is not None else 0)


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
