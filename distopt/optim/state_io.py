"""Saving and restoring a ShardedOptimizer's state: per shard, or whole and per parameter.

A shard state dict only fits the rank and plan that wrote it; the full state dict is
keyed by parameter name and can be loaded by any world size or stage (the reshard path).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distopt.optim.sharded import ShardedOptimizer

FORMAT = "distopt.sharded_state.v1"


def shard_state_dict(opt: "ShardedOptimizer") -> dict:
    """This rank's state as one flat tensor per state field (new copies), plus what it belongs to."""
    return {**shard_header(opt), "state": {field: torch.cat(ts) for field, ts in state_fields(opt).items()}}


def shard_header(opt: "ShardedOptimizer") -> dict:
    """What :func:`shard_state_dict` says besides the tensors: format, rank, stage, step, rule, plan."""
    return {"format": FORMAT, "rank": opt.comm.rank, "world_size": opt.comm.world_size,
            "zero_stage": opt.zero_stage, "step": opt.step_count, "rule": opt.rule.config(),
            "plan": opt.plan.to_dict()}


def state_fields(opt: "ShardedOptimizer") -> dict[str, list[torch.Tensor]]:
    """The live state this rank holds: field -> its per-bucket tensors (fields the rule keeps)."""
    return {field: ts for field, ts in opt.state._asdict().items() if ts}


def shard_params(opt: "ShardedOptimizer") -> torch.Tensor:
    """A copy of the parameters this rank updates, flat and laid out as its state shard
    (its range of every bucket, in bucket order; at zero_stage 0 every bucket whole)."""
    return torch.cat(opt._p_shards)


def check_shard_state_dict(opt: "ShardedOptimizer", sd: dict) -> None:
    """Raise ValueError unless ``sd`` is this rank's shard of this plan and rule, and loading
    it alone leaves the in-memory redundancy right (it cannot where the state is sharded
    and replicated: the neighbours' copies of the shard would stay stale)."""
    if opt.redundancy is not None and opt.redundancy.sharded:
        raise ValueError("load_state_dict cannot rebuild the in-memory redundancy (replicate=True, "
                         "zero_stage >= 1): load a full_state_dict() with load_full_state_dict() instead")
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        raise ValueError(f"not a distopt shard state dict (format {sd.get('format') if isinstance(sd, dict) else None!r}"
                         f", expected {FORMAT!r})")
    mine = {"rank": opt.comm.rank, "world_size": opt.comm.world_size, "plan": opt.plan.to_dict()}
    for key, value in mine.items():
        if sd[key] != value:
            raise ValueError(f"state dict was saved with a different {key} ({key}={_short(sd[key])}, this optimizer "
                             f"has {_short(value)}): load full_state_dict() output with load_full_state_dict() instead")
    _check_rule(opt, sd["rule"])
    fields = opt.state._asdict()
    if set(sd["state"]) != {f for f, ts in fields.items() if ts}:
        raise ValueError(f"state fields {sorted(sd['state'])} do not match this rule's {sorted(fields)}")


def load_shard_state_dict(opt: "ShardedOptimizer", sd: dict) -> None:
    """Copy a shard state dict checked by :func:`check_shard_state_dict` back in."""
    fields = opt.state._asdict()
    for field, flat in sd["state"].items():
        torch._foreach_copy_(fields[field], list(flat.to(fields[field][0]).split([t.numel() for t in fields[field]])))
    opt.step_count = int(sd["step"])


def full_state_dict(opt: "ShardedOptimizer") -> dict:
    """Gather every field bucket by bucket into ``{name: {field: tensor shaped like the param}}``.

    Every rank must call it (one allgather per bucket and field at stage >= 1); extra memory
    beyond the result is one bucket.
    """
    lay = opt.plan.layout
    per_param: dict[str, dict[str, torch.Tensor]] = {n: {} for n in opt.names}
    for field, shards in opt.state._asdict().items():
        for b, shard in enumerate(shards):
            bucket = opt.comm.allgather(shard) if opt.zero_stage >= 1 else shard
            start = lay.buckets[b][0]
            for i in lay.members(b):
                o = lay.offsets[i] - start
                per_param[opt.names[i]][field] = bucket[o:o + lay.numels[i]].view(opt._tensors[i].shape).clone()
    return {"format": FORMAT + ".full", "step": opt.step_count, "rule": opt.rule.config(), "state": per_param}


def load_full_state_dict(opt: "ShardedOptimizer", full: dict) -> None:
    """Cut this rank's shard (and, with redundancy, its neighbour's replica) out of a full state dict."""
    if not isinstance(full, dict) or full.get("format") != FORMAT + ".full":
        raise ValueError("not a distopt full state dict: pass the output of full_state_dict()")
    _check_rule(opt, full["rule"])
    missing = sorted(set(opt.names) - set(full["state"]))
    if missing:
        raise ValueError(f"full state dict has no state for parameters {missing[:5]}")
    fill_shard(opt, full, opt.comm.rank if opt.zero_stage >= 1 else 0, opt.state)
    opt.step_count = int(full["step"])
    if opt.redundancy is not None:
        opt.redundancy.load_full(full)


def fill_shard(opt: "ShardedOptimizer", full: dict, shard_rank: int, state) -> None:
    """Copy rank ``shard_rank``'s slice of every field of ``full`` into ``state`` (per-bucket lists)."""
    lay = opt.plan.layout
    for field, shards in state._asdict().items():
        if not shards:  # a rule without this state (SGD without momentum)
            continue
        for b, ((start, end), (s, e)) in enumerate(zip(lay.buckets, opt.plan.ranges(shard_rank))):
            bucket = shards[b].new_zeros(end - start)
            for i in lay.members(b):
                src = full["state"][opt.names[i]][field]
                if src.numel() != lay.numels[i]:
                    raise ValueError(f"state {field!r} of {opt.names[i]!r} has {src.numel()} elements, "
                                     f"the parameter has {lay.numels[i]}")
                bucket[lay.offsets[i] - start: lay.offsets[i] - start + lay.numels[i]].copy_(src.reshape(-1))
            shards[b].copy_(bucket[s - start: e - start])


def _check_rule(opt: "ShardedOptimizer", saved: dict) -> None:
    if saved.get("rule") != opt.rule.name:
        raise ValueError(f"state was saved for rule {saved.get('rule')!r}, this optimizer runs {opt.rule.name!r}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."
