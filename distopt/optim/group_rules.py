"""Each parameter group's update rule, made from the group's hyperparameters at each step.

Parameter groups are live (a scheduler sets ``group["lr"]`` between steps), so the rule of
update ``k`` is the base rule with the groups' values when ``k`` is made. They are kept for
:data:`HISTORY` updates, so a replica that replays update ``k`` later (:mod:`distopt.ft`)
uses exactly the owner's values.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from distopt.optim.rules import Rule, clipped, fields_kept, state_of, with_hyperparameters

HISTORY = 128  # updates whose per-group rules are kept


class GroupRules:
    """The rules of ``param_groups`` over the buckets of a plan (``bucket_group``, ``bucket_dtype``)."""

    def __init__(self, rule: Rule, param_groups: list[dict], bucket_group: Sequence[int],
                 bucket_dtype: Sequence[torch.dtype]) -> None:
        self.base, self.groups = rule, param_groups
        self.bucket_group, self.bucket_dtype = list(bucket_group), list(bucket_dtype)
        now = self._made()  # (checks every group's values before any work)
        # A group may turn on state the defaults lack (SGD momentum): the rule that keeps the most makes it.
        self.state_rule = max(now, key=fields_kept)
        self._at: dict[int, list[Rule]] = {}
        self._fields: dict[Rule, int] = {}

    def _kept(self, rule: Rule) -> int:
        # Counted once per distinct rule: it builds the rule's state for one element.
        if rule not in self._fields:
            self._fields[rule] = fields_kept(rule)
        return self._fields[rule]

    def _made(self) -> list[Rule]:
        return [with_hyperparameters(self.base, g, f"param group {i}") for i, g in enumerate(self.groups)]

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
            if any(r is not self.base and self._kept(r) > self._kept(self.state_rule) for r in rules):
                raise ValueError("a parameter group's hyperparameters now need optimizer state it was built without "
                                 "(e.g. SGD momentum turned on from 0): give the rule or the group a nonzero value "
                                 "at construction")
            self._at[step] = rules
            for old in [s for s in self._at if s <= step - HISTORY]:
                del self._at[old]
        return self._at[step]

    def apply(self, step: int, buckets: Sequence[int], params: list[torch.Tensor], grads: list[torch.Tensor],
              state: Any, scale: float = 1.0) -> None:
        """Update ``step`` in place: ``params[i]``, ``grads[i]`` and each state field's ``[i]``
        are (a piece of) bucket ``buckets[i]``; one rule call per group and dtype. ``grads``
        are scaled by the clipping factor ``scale`` into new tensors, never changed."""
        rules, grads = self.at(step), clipped(grads, scale)
        keys = [(self.bucket_group[b], self.bucket_dtype[b]) for b in buckets]
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            rules[key[0]].update([params[i] for i in idx], [grads[i] for i in idx], state_of(state, idx), step)
