"""What a :class:`~distopt.optim.ShardedOptimizer` is given to train, checked and put in order.

``params`` takes the shapes torch optimizers take: an iterable of tensors, ``(name, tensor)``
pairs (``model.named_parameters()``), a ``name -> tensor`` dict, or parameter groups (dicts
with ``"params"`` holding any of those, plus overrides of the rule's hyperparameters). A
pure function of its input: every rank derives the same groups and names.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch

from distopt.collectives.buckets import DEFAULT_BUCKET_BYTES
from distopt.optim.group_rules import fields_of, group_rule
from distopt.optim.plan import Arrangement, ShardPlan, build_plan, shard_count
from distopt.optim.rules import Rule, check_rule, hyperparameters


class Managed(NamedTuple):
    """The trainable tensors, each once, with its name and group (in the order given)."""

    names: list[str]
    tensors: list[torch.Tensor]
    group_of: list[int]  # index into the groups


def normalize(params: Any, rule: Rule) -> tuple[list[dict], Managed]:
    """Torch-style groups (``"params"``, ``"param_names"``, ``"rule"``, overrides) and the
    tensors to manage.

    A tensor listed twice in one group (tied weights under two names) is one parameter, kept
    under its first name; ``requires_grad=False`` tensors stay in their group but get no
    state and no traffic. A group's ``"rule"`` replaces ``rule`` for its tensors, and its
    overrides are that rule's hyperparameters.

    Raises:
        TypeError: ``params`` has an unknown shape, a group's ``rule`` is not an update rule,
            or a parameter is not a floating-point tensor.
        ValueError: an empty group, a group key that is neither ``params`` nor one of the
            group rule's hyperparameters, a tensor in two groups, a tensor that is not 2-D in
            a whole-matrix (Muon) group, or nothing trainable.
    """
    raw = _as_groups(params)
    groups, seen = [], {}
    names, tensors, group_of = [], [], []
    for g, group in enumerate(raw):
        where = f"param group {g}" if len(raw) > 1 else "params"
        own = group.get("rule")
        if own is not None:
            check_rule(own, f"{where}['rule']")
        hyper = hyperparameters(own if own is not None else rule)
        unknown = sorted(set(group) - {"params", "param_names", "rule"} - set(hyper))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}: a group takes 'params', 'rule' and overrides "
                             f"of its rule's hyperparameters {sorted(hyper)}")
        pairs = _pairs(group["params"], group.get("param_names"), start=len(names), where=where)
        if not pairs:
            raise ValueError(f"{where} is empty: drop the group or give it parameters")
        kept: list[tuple[str, torch.Tensor]] = []
        for name, t in pairs:
            _check_tensor(name, t)
            if getattr(own if own is not None else rule, "whole_matrices", False) and t.ndim != 2:
                raise ValueError(f"parameter {name!r} of {where} has shape {tuple(t.shape)}: "
                                 f"{(own or rule).name} updates 2-D matrices only; put it in a group with another "
                                 f"rule (e.g. AdamW for embeddings of other shapes, biases and norms)")
            if id(t) in seen:
                first_group, first_name = seen[id(t)]
                if first_group != g:
                    raise ValueError(f"parameter {name!r} is in param group {first_group} (as {first_name!r}) and "
                                     f"in param group {g}: put each parameter in one group")
                continue  # tied: one tensor under a second name
            seen[id(t)] = (g, name)
            kept.append((name, t))
            if t.requires_grad:
                names.append(name)
                tensors.append(t)
                group_of.append(g)
        groups.append({**{k: v for k, v in group.items() if k not in ("params", "param_names")},
                       "params": [t for _, t in kept], "param_names": [n for n, _ in kept]})
    if not tensors:
        raise ValueError("no parameter requires grad (requires_grad=False tensors are frozen): pass the trainable "
                         "parameters, or call .requires_grad_() on plain tensors")
    return groups, Managed(names, tensors, group_of)


class Planned(NamedTuple):
    """Where an optimizer over ``params`` puts them: a pure function of its arguments."""

    groups: list[dict]  # torch-style groups, as normalized
    plan: ShardPlan
    arrangement: Arrangement
    names: list[str]  # in plan order
    tensors: list[torch.Tensor]  # in plan order
    fields: list[str]  # the state fields any group's rule keeps


def plan_params(params: Any, rule: Rule, world_size: int, zero_stage: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                last_bucket_bytes: int | None = 2**20) -> Planned:
    """The groups, plan and state fields of a ShardedOptimizer with these arguments, without
    building it (a recovery rebuilds the plan of a group that is gone)."""
    groups, managed = normalize(params, rule)
    rules = [group_rule(rule, g, f"param group {i}") for i, g in enumerate(groups)]
    matrix_groups = [g for g, r in enumerate(rules) if r.whole_matrices]
    plan, arr = build_plan(managed.names, managed.tensors, world_size, zero_stage, bucket_bytes, last_bucket_bytes,
                           managed.group_of, matrix_groups)
    return Planned(groups, plan, arr, [managed.names[i] for i in arr.order], [managed.tensors[i] for i in arr.order],
                   list(dict.fromkeys(f for r in rules for f in fields_of(r))))


def _as_groups(params: Any) -> list[dict]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params is a single tensor: pass a list of tensors, a name -> tensor dict "
                        "or model.named_parameters()")
    if isinstance(params, Mapping):
        return [{"params": params}]
    if not isinstance(params, Iterable):
        raise TypeError(f"params must be an iterable of tensors, a name -> tensor dict or a list of parameter "
                        f"groups, got {type(params).__name__}: pass model.parameters() or model.named_parameters()")
    items = list(params)
    if items and all(isinstance(x, Mapping) for x in items):
        for g, group in enumerate(items):
            if "params" not in group:
                raise ValueError(f"param group {g} has no 'params' key: give each group {{'params': [...], ...}}")
        return [dict(x) for x in items]
    if any(isinstance(x, Mapping) for x in items):
        raise TypeError("params mixes parameter groups (dicts) with tensors: make every entry a group")
    return [{"params": items}]


def _pairs(params: Any, names: Sequence[str] | None, start: int, where: str) -> list[tuple[str, Any]]:
    if isinstance(params, torch.Tensor):
        params = [params]
    if isinstance(params, Mapping):
        return [(str(k), v) for k, v in params.items()]
    items = list(params)
    if items and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        return [(n, t) for n, t in items]
    if names is not None:
        if len(names) != len(items):
            raise ValueError(f"{where}: param_names has {len(names)} names for {len(items)} parameters")
        return list(zip(map(str, names), items))
    return [(str(start + i), t) for i, t in enumerate(items)]


def _check_tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"parameter {name!r} must be a floating-point tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}: cast it with .float() or leave it out")
    if not t.is_leaf:
        raise ValueError(f"parameter {name!r} is not a leaf tensor (it was computed from others): pass the "
                         f"model's parameters, or .detach().requires_grad_() it")


def check_devices(tensors: Sequence[torch.Tensor]) -> torch.device:
    """The one device every managed tensor lives on.

    Raises:
        TypeError: tensors on several devices.
    """
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise TypeError(f"parameters live on several devices {sorted(map(str, devices))}: move the model with "
                        f".to(device) first")
    return next(iter(devices))


def check_args(rule, zero_stage, bucket_bytes, max_grad_norm) -> None:
    check_rule(rule, "rule")
    shard_count(1, zero_stage)
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes!r} must be a positive int (default 25 MiB)")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} must be > 0, or None for no clipping")


def check_comm(comm: Any) -> None:
    if not all(hasattr(comm, m) for m in ("rank", "world_size", "allreduce", "reduce_scatter", "allgather")):
        raise TypeError(f"comm={comm!r} is not a Communicator: use distopt.collectives.TorchCommunicator, "
                        f"in_process, or None for torch.distributed's default group")


def match_grads(grads: Any, names: list[str], tensors: list[torch.Tensor],
                 order: Sequence[int]) -> list[torch.Tensor]:
    """``grads`` (a name -> tensor dict, or a sequence in the order the parameters were
    given) in plan order, checked."""
    if isinstance(grads, dict):
        missing, extra = sorted(set(names) - set(grads)), sorted(set(grads) - set(names))
        if missing or extra:
            raise ValueError(f"grads do not match params (missing {missing}, unexpected {extra}): pass a dict with "
                             f"the parameters' names")
        gs = [grads[n] for n in names]
    else:
        given = list(grads)
        if len(given) != len(names):
            raise ValueError(f"grads has {len(given)} tensors for {len(names)} parameters: pass one per parameter")
        gs = [given[i] for i in order]
    for n, g, t in zip(names, gs, tensors):
        if not isinstance(g, torch.Tensor) or g.shape != t.shape:
            raise ValueError(f"grads[{n!r}] has shape {tuple(getattr(g, 'shape', ()))}, param has {tuple(t.shape)}")
    return gs
