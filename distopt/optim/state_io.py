"""Saving, restoring and counting a ShardedOptimizer's state: per shard, or whole and per parameter.

A shard state dict only fits the rank and plan that wrote it; the full state dict is
keyed by parameter name and can be loaded by any world size or stage (the reshard path).
"""
from __future__ import annotations

from typing import Any

import torch

from distopt.optim.group_rules import state_bytes

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
    """Each group's rule and hyperparameters now, as plain data (a schedule is kept by the
    rule, not here), with the names of its parameters."""
    out = []
    for g in opt.param_groups:
        rule = g.get("rule") or opt.rule
        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                  if k not in ("params", "param_names", "rule") and not callable(v)}
        out.append({**values, "rule_name": rule.name, "param_names": list(g.get("param_names", []))})
    return out


def state_fields(opt: ShardedOptimizer) -> dict[str, list[torch.Tensor]]:
    """The state this rank holds, field -> one tensor per bucket, each its shard's length:
    where a bucket's rule keeps no such field, a read-only zero view stands in (so every
    field lays out as the parameters do, in checkpoints and recovery)."""
    return {f: full_pieces(ts, opt.shard_params) for f, ts in opt.shard_state.items()}


def full_pieces(pieces: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``pieces`` with each empty one (a field its bucket's rule does not keep) replaced by a
    zero view as long as the matching tensor of ``like``; no memory is allocated for it."""
    return [t if t.numel() == p.numel() else p.new_zeros(()).expand(p.numel()) for t, p in zip(pieces, like)]


def memory_bytes(opt: ShardedOptimizer) -> dict[str, int]:
    """Bytes ``opt`` holds, by what they are (see :meth:`ShardedOptimizer.memory_bytes`)."""
    def size(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)
    buckets = opt.grad_buckets.flats() if opt.grad_buckets is not None else []
    in_buckets = {f.untyped_storage().data_ptr() for f in buckets}
    return {"params": size(opt.params_flat.flats()), "grads": size(buckets),
            "grad_shards": size([g for g in opt.grad_shards if g.untyped_storage().data_ptr() not in in_buckets]),
            "state": state_bytes(opt.shard_state), "packing": opt.reducer.packing_bytes()}


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
    if set(sd["state"]) != set(opt.shard_state):
        raise ValueError(f"state fields {sorted(sd['state'])} do not match this optimizer's {sorted(opt.shard_state)}")


def load_shard_state_dict(opt: ShardedOptimizer, sd: dict) -> None:
    """Copy a shard state dict checked by :func:`check_shard_state_dict` back in."""
    for field, flat in sd["state"].items():
        live = opt.shard_state[field]
        kept = [b for b, t in enumerate(live) if t.numel() == opt.shard_params[b].numel()]
        pieces = _split(flat, opt.shard_params)
        torch._foreach_copy_([live[b] for b in kept], [pieces[b] for b in kept])
    opt.step_count = int(sd["step"])
    set_group_hyperparameters(opt, sd.get("param_groups"))


def full_state_dict(opt: ShardedOptimizer) -> dict:
    """Gather every field bucket by bucket into ``{name: {field: tensor shaped like the param}}``.

    Every rank must call it (one allgather per bucket and field at stage >= 1); extra memory
    beyond the result is one bucket.
    """
    lay = opt.plan.layout
    per_param: dict[str, dict[str, torch.Tensor]] = {n: {} for n in opt.names}
    for field, shards in opt.shard_state.items():
        for b, shard in enumerate(shards):
            if field not in opt.rules.bucket_fields[b]:
                continue  # (the same buckets on every rank)
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


def fill_shard(opt: ShardedOptimizer, full: dict, shard_rank: int, state: dict) -> None:
    """Copy rank ``shard_rank``'s slice of every field of ``full`` into ``state`` (per-bucket
    lists; a bucket whose rule keeps no such field is skipped)."""
    lay = opt.plan.layout
    for field, shards in state.items():
        for b, ((start, end), (s, e)) in enumerate(zip(lay.buckets, opt.plan.ranges(shard_rank))):
            if field not in opt.rules.bucket_fields[b]:
                continue
            bucket = shards[b].new_zeros(end - start)
            for i in lay.members(b):
                src = full["state"][opt.names[i]][field]
                if src.numel() != lay.numels[i]:
                    raise ValueError(f"state {field!r} of {opt.names[i]!r} has {src.numel()} elements, "
                                     f"the parameter has {lay.numels[i]}")
                bucket[lay.offsets[i] - start: lay.offsets[i] - start + lay.numels[i]].copy_(src.reshape(-1))
            shards[b].copy_(bucket[s - start: e - start])


def _check_groups(opt: ShardedOptimizer, saved: list | None) -> None:
    if saved is None:
        return
    mine = group_hyperparameters(opt)
    if len(saved) != len(mine):
        raise ValueError(f"state was saved with {len(saved)} parameter groups, this optimizer has "
                         f"{len(mine)}: build it with the same groups")
    for g, (then, now) in enumerate(zip(saved, mine)):
        for key in ("rule_name", "param_names"):
            if key in then and then[key] != now[key]:
                raise ValueError(f"param group {g} was saved with {key}={_short(then[key])}, this optimizer's has "
                                 f"{_short(now[key])}: build it with the same groups and rules")


def set_group_hyperparameters(opt: ShardedOptimizer, saved: list | None) -> None:
    """Put saved hyperparameter values (a scheduler's lr, say) back into the live groups."""
    for group, values in zip(opt.param_groups, saved or []):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()
                      if k not in ("rule_name", "param_names")})


def _check_rule(opt: ShardedOptimizer, saved: dict) -> None:
    if saved.get("rule") != opt.rule.name:
        raise ValueError(f"state was saved for rule {saved.get('rule')!r}, this optimizer runs {opt.rule.name!r}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."
