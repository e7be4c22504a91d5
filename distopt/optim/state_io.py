"""Saving and restoring a ShardedOptimizer's state: per shard, or whole and per parameter.

A shard state dict only fits the rank and plan that wrote it; the full state dict is
keyed by parameter name and can be loaded by any world size or stage (the reshard path).
"""
from __future__ import annotations

from typing import Any

import torch

ShardedOptimizer = Any  # (the optimizer imports this module; naming its class here would be a cycle)

FORMAT = "distopt.sharded_state.v1"


def shard_state_dict(opt: ShardedOptimizer) -> dict:
    """This rank's state as one flat tensor per state field and dtype (new copies), plus what
    it belongs to."""
    return {**shard_header(opt), "param_groups": group_hyperparameters(opt),
            "state": {field: _cat(ts) for field, ts in state_fields(opt).items()}}


def shard_header(opt: ShardedOptimizer) -> dict:
    """What :func:`shard_state_dict` says besides the tensors: format, rank, stage, step, rule, plan."""
    return {"format": FORMAT, "rank": opt.comm.rank, "world_size": opt.comm.world_size,
            "zero_stage": opt.zero_stage, "step": opt.step_count, "rule": opt.rule.config(),
            "plan": opt.plan.to_dict()}


def group_hyperparameters(opt: ShardedOptimizer) -> list[dict]:
    """Each group's hyperparameters now, as plain data (a schedule is kept by the rule, not here)."""
    names = list(opt.defaults)
    return [{k: (list(g[k]) if isinstance(g[k], tuple) else g[k]) for k in names if not callable(g[k])}
            for g in opt.param_groups]


def state_fields(opt: ShardedOptimizer) -> dict[str, list[torch.Tensor]]:
    """The live state this rank holds: field -> its per-bucket tensors (fields the rule keeps)."""
    return {field: ts for field, ts in opt.shard_state._asdict().items() if ts}


def shard_params(opt: ShardedOptimizer) -> torch.Tensor:
    """A copy of the parameters this rank updates, flat and laid out as its state shard
    (its range of every bucket, in bucket order; at zero_stage 0 every bucket whole)."""
    return _cat(opt.shard_params)


def _cat(ts: list[torch.Tensor]):
    """One flat tensor where the buckets share a dtype, else one per dtype (a list)."""
    if len({t.dtype for t in ts}) == 1:
        return torch.cat(ts)
    return [torch.cat([t for t in ts if t.dtype == d]) for d in dict.fromkeys(t.dtype for t in ts)]


def _split(flat, like: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(flat, torch.Tensor):
        flat = [flat]
    by_dtype = {d: iter(f.split([t.numel() for t in like if t.dtype == d]))
                for d, f in zip(dict.fromkeys(t.dtype for t in like), flat)}
    return [next(by_dtype[t.dtype]) for t in like]


def check_shard_state_dict(opt: ShardedOptimizer, sd: dict) -> None:
    """Raise ValueError unless ``sd`` is this rank's shard of this plan, rule and groups (a
    layer on the hooks may refuse it too: ``before_load``)."""
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        raise ValueError(f"not a distopt shard state dict (format {sd.get('format') if isinstance(sd, dict) else None!r}"
                         f", expected {FORMAT!r})")
    mine = {"rank": opt.comm.rank, "world_size": opt.comm.world_size, "plan": opt.plan.to_dict()}
    for key, value in mine.items():
        if sd[key] != value:
            raise ValueError(f"state dict was saved with a different {key} ({key}={_short(sd[key])}, this optimizer "
                             f"has {_short(value)}): load full_state_dict() output with load_full_state_dict() instead")
    _check_rule(opt, sd["rule"])
    _check_groups(opt, sd.get("param_groups"))
    fields = opt.shard_state._asdict()
    if set(sd["state"]) != {f for f, ts in fields.items() if ts}:
        raise ValueError(f"state fields {sorted(sd['state'])} do not match this rule's {sorted(fields)}")


def load_shard_state_dict(opt: ShardedOptimizer, sd: dict) -> None:
    """Copy a shard state dict checked by :func:`check_shard_state_dict` back in."""
    fields = opt.shard_state._asdict()
    for field, flat in sd["state"].items():
        torch._foreach_copy_(fields[field], _split(flat, fields[field]))
    opt.step_count = int(sd["step"])
    set_group_hyperparameters(opt, sd.get("param_groups"))


def full_state_dict(opt: ShardedOptimizer) -> dict:
    """Gather every field bucket by bucket into ``{name: {field: tensor shaped like the param}}``.

    Every rank must call it (one allgather per bucket and field at stage >= 1); extra memory
    beyond the result is one bucket.
    """
    lay = opt.plan.layout
    per_param: dict[str, dict[str, torch.Tensor]] = {n: {} for n in opt.names}
    for field, shards in opt.shard_state._asdict().items():
        for b, shard in enumerate(shards):
            bucket = opt.comm.allgather(shard) if opt.plan.world_size > 1 else shard
            start = lay.buckets[b][0]
            for i in lay.members(b):
                o = lay.offsets[i] - start
                per_param[opt.names[i]][field] = bucket[o:o + lay.numels[i]].view(opt.tensors[i].shape).clone()
    return {"format": FORMAT + ".full", "step": opt.step_count, "rule": opt.rule.config(),
            "param_groups": group_hyperparameters(opt), "state": per_param}


def check_full_state_dict(opt: ShardedOptimizer, full: dict) -> None:
    """Raise ValueError unless ``full`` is a full state dict this optimizer can take."""
    if not isinstance(full, dict) or full.get("format") != FORMAT + ".full":
        raise ValueError("not a distopt full state dict: pass the output of full_state_dict()")
    _check_rule(opt, full["rule"])
    missing = sorted(set(opt.names) - set(full["state"]))
    if missing:
        raise ValueError(f"full state dict has no state for parameters {missing[:5]}")
    _check_groups(opt, full.get("param_groups"))


def load_full_state_dict(opt: ShardedOptimizer, full: dict) -> None:
    """Cut this rank's shard out of a full state dict checked by :func:`check_full_state_dict`."""
    fill_shard(opt, full, opt.comm.rank if opt.plan.world_size > 1 else 0, opt.shard_state)
    opt.step_count = int(full["step"])
    set_group_hyperparameters(opt, full.get("param_groups"))


def fill_shard(opt: ShardedOptimizer, full: dict, shard_rank: int, state) -> None:
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


def _check_groups(opt: ShardedOptimizer, saved: list | None) -> None:
    if saved is not None and len(saved) != len(opt.param_groups):
        raise ValueError(f"state was saved with {len(saved)} parameter groups, this optimizer has "
                         f"{len(opt.param_groups)}: build it with the same groups")


def set_group_hyperparameters(opt: ShardedOptimizer, saved: list | None) -> None:
    """Put saved hyperparameter values (a scheduler's lr, say) back into the live groups."""
    for group, values in zip(opt.param_groups, saved or []):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})


def _check_rule(opt: ShardedOptimizer, saved: dict) -> None:
    if saved.get("rule") != opt.rule.name:
        raise ValueError(f"state was saved for rule {saved.get('rule')!r}, this optimizer runs {opt.rule.name!r}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."
