"""Reshard on load: per-rank flat optimizer shards back into per-parameter state and weights.

A shard only fits the plan that cut it. Rebuilding the per-parameter full state dict from
the saved plan lets a checkpoint written by N workers at any zero_stage load on M workers
at any stage: the loader passes the result to ``ShardedOptimizer.load_full_state_dict``,
which cuts the new rank's shard out of it.

Memory: the whole optimizer state plus one field's flat buffer. A bounded-memory variant
(one bucket at a time, reading only the byte ranges a new rank needs) is not written yet.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Mapping

import torch

from distopt.checkpoint.format import FORMAT, PARAM_FIELD, CheckpointError
from distopt.checkpoint.manifest import shard_tensor_names
from distopt.collectives.buckets import Layout
from distopt.optim.plan import ShardPlan
from distopt.optim.state_io import FORMAT as STATE_FORMAT


def full_state_from_shards(manifest: dict, shard_tensors: dict[int, dict[str, torch.Tensor]]) -> dict:
    """Rebuild ``{param_name: {field: tensor shaped like the param}}`` from saved flat shards.

    Args:
        manifest: the checkpoint's manifest (plan, params, state_fields, rule, optimizer_step).
        shard_tensors: shard rank -> field -> this rank's flat shard, for every rank of the
            plan (at zero_stage 0 the plan has one rank: rank 0 holds everything).

    Returns:
        ``{"format": "distopt.sharded_state.v1.full", "step", "rule", "state"}``, the shape
        of ``ShardedOptimizer.full_state_dict()``; tensors are new (not views of the shards).

    Raises:
        CheckpointError: the plan is inconsistent, ranks or fields are missing, or a shard
            has the wrong size or dtype for the plan.
    """
    plan = plan_from_dict(manifest["plan"])
    fields = list(manifest["state_fields"])
    _check_shards(plan, shard_tensor_names(manifest), shard_tensors)
    state: dict[str, dict[str, torch.Tensor]] = {p["name"]: {} for p in manifest["params"]}
    shapes = [p["shape"] for p in manifest["params"]]
    for field in fields:
        flat = _gather(plan, [shard_tensors[r][field] for r in range(plan.world_size)])
        for p, view in zip(manifest["params"], plan.unflatten(flat, shapes)):
            state[p["name"]][field] = view.clone()
    return {"format": STATE_FORMAT + ".full", "step": manifest["optimizer_step"], "rule": manifest["rule"],
            "param_groups": manifest.get("param_groups"), "state": state}


def weights_from_shards(manifest: dict, shard_tensors: dict[int, dict[str, torch.Tensor]],
                        model_file: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's weights, in its state dict's order, from the shards' parameter slices and
    ``model.bin`` (``model_file``: what no parameter holds). A v1 checkpoint kept every weight
    in ``model.bin``: that is returned as it is.

    Raises:
        CheckpointError: as :func:`full_state_from_shards`, or ``model_file`` lacks a key.
    """
    if manifest["format"] != FORMAT:
        return dict(model_file)
    plan = plan_from_dict(manifest["plan"])
    _check_shards(plan, shard_tensor_names(manifest), shard_tensors)
    flat = _gather(plan, [shard_tensors[r][PARAM_FIELD] for r in range(plan.world_size)])
    params = {p["name"]: view.clone()
              for p, view in zip(manifest["params"], plan.unflatten(flat, [p["shape"] for p in manifest["params"]]))}
    missing = [key for key, source in manifest["model_keys"] if not source and key not in model_file]
    if missing:
        raise CheckpointError(f"model.bin lacks {missing[:5]} that the manifest places there. Fix: use another "
                              f"checkpoint")
    return {key: params[source] if source else model_file[key] for key, source in manifest["model_keys"]}


def cut_params(fields: dict, model_state: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every shard rank's flat slice of the parameters, cut from whole weights by the plan in
    ``fields`` (the inverse of :func:`weights_from_shards`, for writing from one process)."""
    plan = plan_from_dict(fields["plan"])
    key_of: dict[str, str] = {}
    for key, source in fields["model_keys"]:
        if source:
            key_of.setdefault(source, key)
    tensors = [model_state[key_of[p["name"]]] for p in fields["params"]]
    flat = tensors[0].new_zeros(plan.layout.total)
    for view, t in zip(plan.unflatten(flat, [p["shape"] for p in fields["params"]]), tensors):
        view.copy_(t.detach())  # (a model's parameters require grad)
    return [torch.cat([flat[s:e] for s, e in plan.ranges(r)]) for r in range(plan.world_size)]


def plan_from_dict(d: dict) -> ShardPlan:
    """Rebuild a :class:`ShardPlan` from ``ShardPlan.to_dict()`` output, checking it is consistent.

    Raises:
        CheckpointError: the dict is not a plan ``plan()`` could have made.
    """
    try:
        buckets = tuple((int(s), int(e)) for s, e in d["buckets"])
        offsets, numels = tuple(int(o) for o in d["offsets"]), tuple(int(n) for n in d["numels"])
        starts = [s for s, _ in buckets]
        # Which bucket holds each tensor: the last one starting at or before its offset.
        bucket_of = tuple(max(0, bisect_right(starts, o) - 1) for o in offsets)
        plan = ShardPlan(int(d["world_size"]), int(d["align"]), Layout(offsets, numels, buckets, int(d["total"]),
                                                                       bucket_of))
        ok = plan.world_size >= 1 and _covers(plan) and plan.to_dict() == d
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"saved plan is malformed ({type(e).__name__}: {e}). Fix: use another checkpoint") \
            from None
    if not ok:
        raise CheckpointError(f"saved plan {d!r} is inconsistent (buckets do not tile the buffer, split evenly "
                              f"over its ranks or hold their tensors). Fix: use another checkpoint")
    return plan


def _covers(plan: ShardPlan) -> bool:
    lay, pos = plan.layout, 0
    for start, end in lay.buckets:
        if start != pos or end < start or (end - start) % plan.world_size:
            return False
        pos = end
    inside = all(lay.buckets[b][0] <= o and o + n <= lay.buckets[b][1]
                 for o, n, b in zip(lay.offsets, lay.numels, lay.bucket_of))
    return pos == lay.total and inside and len(lay.offsets) == len(lay.numels)


def _check_shards(plan: ShardPlan, names: list[str], shard_tensors: dict) -> None:
    want = list(range(plan.world_size))
    if sorted(shard_tensors) != want:
        raise CheckpointError(f"got shards of ranks {sorted(shard_tensors)}; the saved plan needs exactly {want}. "
                              f"Fix: read every shard of the checkpoint (read_shards)")
    numel = plan.shard_numel()
    for rank, shard in shard_tensors.items():
        if sorted(shard) != sorted(names):
            raise CheckpointError(f"shard {rank} holds fields {sorted(shard)}, the manifest lists {sorted(names)}. "
                                  f"Fix: use another checkpoint")
        for field, t in shard.items():
            if t.numel() != numel or t.dtype != shard_tensors[0][field].dtype:
                raise CheckpointError(f"shard {rank} field {field!r} has {t.numel()} {t.dtype} elements; the plan "
                                      f"gives every rank {numel}. Fix: use another checkpoint")


def _gather(plan: ShardPlan, shards: list[torch.Tensor]) -> torch.Tensor:
    # The inverse of the optimizer's cut: rank r's flat shard is its range of every bucket, in bucket order.
    flat = shards[0].new_zeros(plan.layout.total)
    for rank, shard in enumerate(shards):
        plan.place(rank, shard.reshape(-1), flat)
    return flat
