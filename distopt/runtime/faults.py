"""Fault injection for chaos tests: kill or stop a worker's own process at a named phase.

A :class:`Fault` fires once, in the worker's first incarnation only, so the step redone
by the replacement runs clean. The exception is phase ``"setup"``: it fires in the fresh
replacement actor started for ``rank`` after a failure in ``step``, while that actor builds
its model (as when its node goes away during the start), so the replacement never joins.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

# "recovery": while re-forming the group after another rank's failure.
# "setup": a fresh replacement for the rank, while it starts (see the module docstring).
# "eval": while evaluating on the weights after ``step`` committed steps.
PHASES = ("data", "compute", "grad_collective", "shard_update", "param_gather", "checkpoint", "recovery", "setup",
          "eval")
ACTIONS = ("kill", "stop")


@dataclass(frozen=True)
class Fault:
    """Kill (SIGKILL) or stop (SIGSTOP) rank ``rank`` when it reaches ``phase`` of 0-based ``step``."""

    rank: int
    step: int
    phase: str
    action: str = "kill"

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r} must be one of {PHASES}")
        if self.action not in ACTIONS:
            raise ValueError(f"action={self.action!r} must be one of {ACTIONS}")


def maybe_fire(faults: tuple[Fault, ...], rank: int, incarnation: int, step: int, phase: str) -> None:
    """Send this process the signal of the matching fault, if any."""
    if (incarnation > 0) != (phase == "setup"):  # "setup" fires in replacements, the rest in first incarnations
        return
    for f in faults:
        if f.rank == rank and f.step == step and f.phase == phase:
            os.kill(os.getpid(), signal.SIGKILL if f.action == "kill" else signal.SIGSTOP)
