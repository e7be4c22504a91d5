"""Rebuilding the last committed state on a new group after ranks were lost.

Every rank of the new group calls :func:`assemble` with the shards it can vouch for: a
survivor its own (rolled back) shard and its replica of its left neighbour (the rank
``replica_distance`` before it). For each shard
of the old plan one holder broadcasts it; every rank ends with the full parameters and
optimizer state of the last commit, from which a new ShardedOptimizer (same or another
world size) takes its shard. Holders are chosen by the caller with :func:`holders`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from distopt.collectives.base import Communicator
from distopt.optim.plan import ShardPlan
from distopt.ft.errors import RecoveryError
from distopt.ft.redundancy import Redundancy
from distopt.ft.shard import Shard
from distopt.optim.rules import Rule
from distopt.optim.sharded import ShardedOptimizer
from distopt.optim.state_io import FORMAT


def holders(old_plan_ranks: int, alive: dict[int, int], replicated: bool, distance: int = 1) -> list[int]:
    """For each old shard, the new rank that holds it at the last commit.

    Args:
        old_plan_ranks: number of shards in the old plan (1 at stage 0).
        alive: old rank -> new rank, for the ranks that survived.
        replicated: whether rank ``o + distance`` holds a replica of shard ``o``.
        distance: the old group's replica distance.

    Raises:
        RecoveryError: a shard and its replica were both lost.
    """
    if not alive:
        raise RecoveryError("no rank survived: restore from a checkpoint")
    if old_plan_ranks == 1:
        return [min(alive.values())]
    old_world = old_plan_ranks
    out = []
    for o in range(old_plan_ranks):
        if o in alive:
            out.append(alive[o])
        elif replicated and (o + distance) % old_world in alive:
            out.append(alive[(o + distance) % old_world])
        else:
            raise RecoveryError(f"shard {o} and its replica on rank {(o + distance) % old_world} were both lost: "
                                f"restore from a checkpoint")
    return out


def packets(opt: ShardedOptimizer, red: Redundancy | None, old_rank: int) -> dict[int, torch.Tensor]:
    """The shards a surviving optimizer (rolled back to the commit) can contribute, keyed by
    old shard index: its own, and with ``red`` its left neighbour's replica."""
    own = 0 if opt.plan.world_size == 1 else old_rank
    out = {own: Shard(opt.shard_params, opt.shard_state, opt.step_count).packet()}
    if red is not None and red.sharded:
        out[red.left] = red.replica_at_commit().packet()
    return out


def assemble(comm: Communicator, old_plan: ShardPlan, rule: Rule, fields: Sequence[str], names: Sequence[str],
             shapes: Sequence[torch.Size], holder_of: list[int], mine: dict[int, torch.Tensor],
             step: int, dtype: torch.dtype, device: torch.device) -> tuple[dict, dict]:
    """Broadcast every old shard from its holder; return ``(params, full_state_dict)``.

    ``fields`` are the old optimizer's state fields, in order (:attr:`ShardedOptimizer.shard_state`).
    A collective: every rank of ``comm`` calls it with the same plan and holders.
    """
    fields = list(fields)
    full = [torch.zeros(old_plan.layout.total, dtype=dtype, device=device) for _ in range(1 + len(fields))]
    for o in range(old_plan.world_size):
        size = old_plan.shard_numel(o)
        if comm.rank == holder_of[o]:
            buf = mine[o].to(device=device, dtype=dtype)
        else:
            buf = torch.empty(size * len(full), dtype=dtype, device=device)
        comm.broadcast(buf, src=holder_of[o])
        for dst, part in zip(full, buf.split(size)):
            old_plan.place(o, part, dst)
    views = [old_plan.unflatten(flat, shapes) for flat in full]
    params = dict(zip(names, views[0]))
    state = {name: {f: views[1 + j][i].clone() for j, f in enumerate(fields)} for i, name in enumerate(names)}
    return params, {"format": FORMAT + ".full", "step": step, "rule": rule.config(), "state": state}
