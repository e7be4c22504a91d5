"""Learning-rate schedules: picklable callables ``step -> lr`` for the update rules.

A rule's ``lr`` may be a float or a callable of the 1-based update number (see
:func:`distopt.optim.rule_base.lr_at`). Schedules are small frozen dataclasses with
``__call__``, not lambdas or closures, because the Trainer ships the rule to every worker
and a lambda defined in a user's ``__main__`` does not always survive the trip.

    constant(3e-4, warmup_steps=100)            linear warmup, then flat
    warmup_cosine(3e-4, total_steps=10_000, warmup_steps=500, min_lr=3e-5)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Constant:
    """``lr`` after a linear warmup of ``warmup_steps`` updates (none when 0)."""

    lr: float
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        """The learning rate of update ``step`` (1-based)."""
        return self.lr * _warmup_factor(step, self.warmup_steps)


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup to ``lr``, then a half cosine down to ``min_lr`` at ``total_steps``.

    Past ``total_steps`` the rate stays at ``min_lr``, so a run resumed for a few extra
    steps does not jump back up.
    """

    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        """The learning rate of update ``step`` (1-based)."""
        if step <= self.warmup_steps:
            return self.lr * _warmup_factor(step, self.warmup_steps)
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Scaled:
    """``schedule`` times ``factor``: a parameter group's share of a shared schedule."""

    schedule: "Schedule"
    factor: float

    @property
    def lr(self) -> float:
        """The scaled peak rate."""
        return self.schedule.lr * self.factor

    def __call__(self, step: int) -> float:
        """The learning rate of update ``step`` (1-based)."""
        return self.schedule(step) * self.factor


Schedule = Union[Constant, WarmupCosine, Scaled]


def scaled(schedule: Schedule, lr: float, where: str = "param group") -> Scaled:
    """``schedule`` rescaled so its peak is ``lr``: at every update the rate is
    ``schedule(step) * lr / schedule.lr`` (a group's ``lr`` under the rule's schedule).

    Raises:
        ValueError: ``lr`` is not a finite float >= 0, or the schedule has no peak ``lr``.
    """
    _check_rate(f"{where}: lr", lr)
    peak = getattr(schedule, "lr", None)
    if not isinstance(peak, (int, float)) or not peak > 0:
        raise ValueError(f"{where}: lr={lr} cannot scale the schedule {schedule!r}, which has no peak lr > 0: give "
                         f"the group its own rule, e.g. 'rule': distopt.optim.adam(lr=...)")
    return Scaled(schedule, float(lr) / float(peak))


def _warmup_factor(step: int, warmup_steps: int) -> float:
    # Update 1 gets lr/warmup, not 0: a zero first step would waste an update and leave
    # Adam's moments seeded by a step that moved nothing.
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return max(step, 1) / warmup_steps


def constant(lr: float, warmup_steps: int = 0) -> Constant:
    """A constant learning rate, optionally after a linear warmup.

    Args:
        lr: the rate after warmup; finite, >= 0.
        warmup_steps: updates of linear ramp from ``lr / warmup_steps`` up to ``lr``.

    Raises:
        ValueError: a negative or non-finite lr, or negative warmup_steps.
    """
    _check_rate("lr", lr)
    _check_steps("warmup_steps", warmup_steps, minimum=0)
    return Constant(float(lr), int(warmup_steps))


def warmup_cosine(lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> WarmupCosine:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at update ``total_steps``.

    Args:
        lr: the peak rate, reached at the end of warmup.
        total_steps: the update at which the rate reaches ``min_lr`` (usually the run's steps).
        warmup_steps: updates of linear ramp; must be < total_steps.
        min_lr: the floor of the decay, between 0 and ``lr``.

    Raises:
        ValueError: bad rates or step counts, each message naming the fix.
    """
    _check_rate("lr", lr)
    _check_rate("min_lr", min_lr)
    _check_steps("total_steps", total_steps, minimum=1)
    _check_steps("warmup_steps", warmup_steps, minimum=0)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} leaves no room to decay within total_steps={total_steps}: "
                         f"use warmup_steps < total_steps, or the constant schedule")
    if min_lr > lr:
        raise ValueError(f"min_lr={min_lr} is above lr={lr}: the cosine decays from lr down to min_lr")
    return WarmupCosine(float(lr), int(total_steps), int(warmup_steps), float(min_lr))


def make_schedule(name: str, lr: float, total_steps: int, warmup_steps: int = 0,
                  min_lr: float = 0.0) -> Schedule:
    """Build a schedule by name (``"constant"`` or ``"cosine"``), as the CLI does.

    Raises:
        ValueError: an unknown name, or the errors of :func:`constant` / :func:`warmup_cosine`.
    """
    if name == "constant":
        if min_lr:
            raise ValueError(f"min_lr={min_lr} only applies to the cosine schedule: drop it or use 'cosine'")
        return constant(lr, warmup_steps)
    if name == "cosine":
        return warmup_cosine(lr, total_steps, warmup_steps, min_lr)
    raise ValueError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}")


def _check_rate(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite float >= 0, e.g. 3e-4")


def _check_steps(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
