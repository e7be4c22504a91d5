"""A worker's way back into a re-formed group: from memory (:meth:`RankRecovery.recover`) or,
when memory cannot rebuild the last commit, empty-handed before a checkpoint is loaded
(:meth:`RankRecovery.rejoin`). The other half of :class:`distopt.runtime.worker.Worker`.
"""
from __future__ import annotations

from typing import Any

import torch

from distopt.collectives.base import Communicator
from distopt.collectives.torch_dist import TorchCommunicator
from distopt.ft import Redundancy, recovery
from distopt.optim.params import plan_params
from distopt.optim.sharded import ShardedOptimizer
from distopt.runtime.config import TrainConfig


def join_group(config: TrainConfig, rank: int, world_size: int, host: str, port: int, group_name: str,
               local_host: str | None = None) -> TorchCommunicator:
    """Join the collective group of ``world_size`` at rank 0's ``host:port`` as ``rank``;
    ``local_host`` is the address this rank's transport binds to (its node's IP)."""
    return TorchCommunicator(rank, world_size, host, port, config.backend, config.collective_timeout_s,
                             group_name=group_name, local_host=local_host or _local_host(host))


def _local_host(host: str) -> str | None:
    return "127.0.0.1" if host in ("127.0.0.1", "localhost") else None


class RankRecovery:
    """The recovery steps of a :class:`~distopt.runtime.worker.Worker`, which provides the
    fields and methods below."""

    config: TrainConfig
    rank: int
    world_size: int
    params: dict[str, torch.Tensor]
    comm: Communicator | None
    optimizer: ShardedOptimizer | None
    ft: Redundancy | None
    replica_distance: int
    # What this rank held at the last commit (old shard index -> packet), kept through the
    # attempts of one recovery (its ``episode``), so a recovery cut short by another
    # failure can be attempted again with the same offer.
    _offer: dict[int, torch.Tensor] | None
    _episode: int | None
    _writer: Any

    def recover(self, host: str, port: int, group_name: str, rank: int, world_size: int, committed: int,
                holder_of: list[int], old_world: int, keep: int | None = None, local_host: str | None = None,
                episode: int = 0, replica_distance: int = 1) -> None:
        """Rejoin a re-formed group and return to update ``committed``; a collective.

        Survivors roll back their shard and offer it (and their neighbour's replica); a
        fresh replacement offers nothing. Every rank then rebuilds the committed parameters
        and state. The first ``keep`` ranks (all by default) go on in a group of their own
        and take their shard of the new plan; the others are left idle, to be dropped.

        If another rank fails meanwhile, this raises and may be called again with the same
        ``episode`` (and a new group and holders): it offers again what it held at the
        commit, whatever the first attempt got through. A new ``episode`` starts from what
        the rank holds now. ``holder_of`` names shards by their rank at the commit;
        ``replica_distance`` is the one the group that goes on uses.
        """
        self._inject("recovery")
        self._writer.freeze()  # the parameters are rewritten below, whatever the optimizer does
        self._hold_offer(committed, episode)
        self._leave_group()
        self.rank, self.world_size = rank, world_size
        comm = join_group(self.config, rank, world_size, host, port, group_name, local_host)
        full = self._assemble(comm, committed, holder_of, old_world)
        keep = world_size if keep is None else keep
        if keep < world_size:
            comm, self.world_size = self._keep_first(comm, keep, host, port, group_name), keep
        self._drop_optimizer()
        self.comm, self.replica_distance = comm, replica_distance
        if comm is not None:
            self.optimizer = self._optimizer(comm, sync_params=False)
            self._load_state(full)

    def rejoin(self, host: str, port: int, group_name: str, rank: int, world_size: int,
               local_host: str | None = None, replica_distance: int = 1) -> None:
        """Join a re-formed group as ``rank`` of ``world_size`` with nothing to restore from
        memory; a collective. The caller loads a checkpoint next (:meth:`load`)."""
        self._inject("recovery")
        self._writer.freeze()
        self._offer = None
        self._leave_group()
        self._drop_optimizer()
        self.rank, self.world_size = rank, world_size
        self.connect(host, port, group_name, local_host, replica_distance)

    def _hold_offer(self, committed: int, episode: int) -> None:
        """On the first attempt of recovery ``episode``: roll back to update ``committed``
        and keep what this rank can offer of it (nothing, for a fresh replacement)."""
        if self._offer is None or self._episode != episode:
            self._offer, self._episode = {}, episode
            if self.optimizer is not None:
                if self.ft is None:
                    raise recovery.RecoveryError("a rank without fault tolerance cannot roll back: train with "
                                                 "max_failures > 0, or restore a checkpoint")
                self.ft.rollback(committed)
                self._offer = recovery.packets(self.optimizer, self.ft, self.rank)

    def _assemble(self, comm: TorchCommunicator, committed: int, holder_of: list[int], old_world: int) -> dict:
        """Rebuild the committed parameters (into the model) and state (returned, a full
        state dict) from the offers of every rank of ``comm``."""
        c = self.config
        old = plan_params(self.opt_params(), c.optimizer, old_world, c.zero_stage, c.bucket_bytes, c.last_bucket_bytes)
        tensors = old.tensors
        try:
            params, full = recovery.assemble(comm, old.plan, c.optimizer, old.fields, old.names,
                                             [t.shape for t in tensors], holder_of, self._offer, committed,
                                             tensors[0].dtype, tensors[0].device)
        except Exception:
            comm.close()  # a peer failed: the group is useless, and its threads and sockets must go
            raise
        with torch.no_grad():
            for name, t in self.params.items():
                t.copy_(params[name])
        return full

    def _keep_first(self, comm: TorchCommunicator, keep: int, host: str, port: int,
                    group_name: str) -> TorchCommunicator | None:
        """This rank's group among the first ``keep`` ranks of ``comm`` (None beyond them),
        which is closed."""
        c = self.config
        # The kept ranks need a group of their own size; rank 0's store serves it too.
        try:
            return TorchCommunicator(self.rank, keep, host, port, c.backend, c.collective_timeout_s, store=comm.store,
                                     group_name=group_name + "/kept") if self.rank < keep else None
        finally:
            comm.close()
