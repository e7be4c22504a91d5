"""Each parameter group's update rule, made from the group's hyperparameters at each step.

Parameter groups are live (a scheduler sets ``group["lr"]`` between steps), so the rule of
update ``k`` is the group's rule (its ``"rule"``, else the optimizer's) with the group's
values when ``k`` is made. They are kept for :data:`HISTORY` updates, so a replica that
replays update ``k`` later (:mod:`distopt.ft`) uses exactly the owner's values.

A learning-rate schedule in the optimizer's rule is shared by the groups that do not give
their own ``rule``: a group whose ``lr`` is a number then runs the schedule scaled by
``lr / schedule.lr`` (its rate relative to the schedule's peak).

The state is a dict ``field -> one tensor per bucket``, over every field any group's rule
keeps; a bucket whose rule lacks a field holds an empty tensor there, so a Muon group keeps
one buffer per element and an AdamW group two.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from distopt.optim.plan import ShardPlan
from distopt.optim.rules import Rule, clipped, with_hyperparameters
from distopt.optim.schedules import scaled

HISTORY = 128  # updates whose per-group rules are kept

State = dict  # field -> one tensor per bucket (empty where the bucket's rule keeps no such field)


def fields_of(rule: Rule) -> tuple[str, ...]:
    """The state fields ``rule`` keeps (SGD without momentum: none)."""
    return tuple(f for f, ts in rule.init([torch.zeros(1)])._asdict().items() if ts)


def group_rule(base: Rule, group: dict, where: str) -> Rule:
    """The rule of ``group`` now: its own ``"rule"`` or ``base``, with the group's values."""
    own = group.get("rule")
    values = dict(group)
    if own is None and callable(base.lr) and not callable(group.get("lr", base.lr)):
        values["lr"] = scaled(base.lr, group["lr"], where)
    return with_hyperparameters(own if own is not None else base, values, where)


class GroupRules:
    """The rules of ``param_groups`` over the buckets of a plan (``bucket_group``, ``bucket_dtype``)."""

    def __init__(self, rule: Rule, param_groups: list[dict], bucket_group: Sequence[int],
                 bucket_dtype: Sequence[torch.dtype], plan: ShardPlan, shapes: Sequence[torch.Size]) -> None:
        self.base, self.groups, self.plan, self.shapes = rule, param_groups, plan, list(shapes)
        self.bucket_group, self.bucket_dtype = list(bucket_group), list(bucket_dtype)
        now = self._made()  # (checks every group's values before any work)
        self.group_fields = [fields_of(r) for r in now]
        self.fields = list(dict.fromkeys(f for fs in self.group_fields for f in fs))
        self.bucket_fields = [self.group_fields[g] for g in self.bucket_group]
        self.bucket_whole = [now[g].whole_matrices for g in self.bucket_group]
        self._at: dict[int, list[Rule]] = {}
        # Per distinct rule: its state's NamedTuple class and the fields it keeps (made once,
        # since learning the fields builds a state).
        self._shape: dict[Rule, tuple[type, tuple[str, ...]]] = {}
        self._mats: dict[tuple[int, int], list[tuple[int, int, torch.Size]]] = {}

    def _made(self) -> list[Rule]:
        return [group_rule(self.base, g, f"param group {i}") for i, g in enumerate(self.groups)]

    def at(self, step: int) -> list[Rule]:
        """Each group's rule for update ``step``: made from the groups now the first time it is
        asked for, the same afterwards.

        Raises:
            ValueError: a group's value is not valid for the rule, or needs state the
                optimizer was built without.
            KeyError: ``step`` is older than the history.
        """
        if step not in self._at:
            if self._at and step < max(self._at):
                raise KeyError(f"update {step} is older than the {HISTORY} updates whose hyperparameters are kept")
            rules = self._made()
            for g, r in enumerate(rules):
                if r not in self._shape:
                    self._shape[r] = (type(r.init([])), fields_of(r))
                if not set(self._shape[r][1]) <= set(self.group_fields[g]):
                    raise ValueError(f"param group {g}'s hyperparameters now need optimizer state it was built "
                                     f"without (e.g. SGD momentum turned on from 0): give the group a nonzero value "
                                     f"at construction")
            self._at[step] = rules
            for old in [s for s in self._at if s <= step - HISTORY]:
                del self._at[old]
        return self._at[step]

    def init(self, params: Sequence[torch.Tensor], buckets: Sequence[int] | None = None) -> State:
        """Zero state for pieces ``params`` of ``buckets`` (default: one piece per bucket, in order)."""
        buckets = range(len(params)) if buckets is None else buckets
        return {f: [torch.zeros_like(p) if f in self.bucket_fields[b] else p.new_empty(0)
                    for p, b in zip(params, buckets)] for f in self.fields}

    def matrices(self, rank: int, b: int) -> list[tuple[int, int, torch.Size]]:
        """``(offset, numel, shape)`` of the tensors of bucket ``b`` in shard ``rank``'s slice of
        it, offsets from the slice's start (whole-matrix buckets hold whole tensors per slice)."""
        if (rank, b) not in self._mats:
            lay = self.plan.layout
            s, e = self.plan.ranges(rank)[b]
            self._mats[rank, b] = [(lay.offsets[i] - s, lay.numels[i], self.shapes[i]) for i in lay.members(b)
                                   if s <= lay.offsets[i] < e]
        return self._mats[rank, b]

    def cuts(self, b: int) -> list[int] | None:
        """Where a piece of any shard's slice of bucket ``b`` may start or end without cutting a
        matrix: None for element-wise rules (anywhere), else the slice-relative bounds of the
        rows of :func:`distopt.optim.plan.matrix_layout`, the same in every shard."""
        if not self.bucket_whole[b]:
            return None
        s, e = self.plan.ranges(0)[b]
        width = e - s
        return sorted({o % width for r in range(self.plan.world_size) for o, _, _ in self.matrices(r, b)} | {width})

    def apply(self, step: int, buckets: Sequence[int], params: list[torch.Tensor], grads: list[torch.Tensor],
              state: State, scale: float = 1.0, rank: int = 0, starts: Sequence[int] | None = None) -> None:
        """Update ``step`` in place: ``params[i]``, ``grads[i]`` and each state field's ``[i]``
        are (a piece of) shard ``rank``'s slice of bucket ``buckets[i]``, starting ``starts[i]``
        elements into it (default 0); one rule call per group and dtype. ``grads`` are scaled by
        the clipping factor ``scale`` into new tensors, never changed."""
        rules, grads = self.at(step), clipped(grads, scale)
        starts = [0] * len(params) if starts is None else starts
        keys = [(self.bucket_group[b], self.bucket_dtype[b]) for b in buckets]
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            rule = rules[key[0]]
            cut: Callable[[list], list] = (lambda ts: [ts[i] for i in idx]) if not rule.whole_matrices else \
                (lambda ts: [m for i in idx for m in self._views(ts[i], rank, buckets[i], starts[i])])
            cls, kept = self._shape[rule]  # (at() made it)
            rule_state = cls(*[cut(state[f]) if f in kept else [] for f in cls._fields])
            rule.update(cut(params), cut(grads), rule_state, step)

    def _views(self, piece: torch.Tensor, rank: int, b: int, start: int) -> list[torch.Tensor]:
        out = []
        for o, n, shape in self.matrices(rank, b):
            if start <= o < start + piece.numel():
                if o + n > start + piece.numel():
                    raise ValueError(f"a piece of bucket {b} cuts a matrix (elements {o}..{o + n}): whole-matrix "
                                     f"rules update whole tensors only")
                out.append(piece[o - start:o - start + n].view(shape))
        return out


def state_bytes(state: State) -> int:
    """Bytes a state holds."""
    return sum(t.numel() * t.element_size() for ts in state.values() for t in ts)
