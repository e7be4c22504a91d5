"""What one optimizer step did, and the clock that splits its time into waiting and working."""
from __future__ import annotations

import time
from typing import NamedTuple


class StepInfo(NamedTuple):
    """What one :meth:`ShardedOptimizer.step` did, identical on every rank."""

    step: int  # updates applied so far
    grad_norm: float  # L2 norm of the averaged gradient, before clipping
    skipped: bool  # a non-finite gradient somewhere: no rank updated
    comm_s: float  # seconds waiting for gradient reduction and parameter gather
    update_s: float  # seconds in the update rule and the hooks around it


class StepClock:
    """Seconds since the last lap, summed by kind (a step's ``comm`` and ``update`` time)."""

    def __init__(self) -> None:
        self.comm = self.update = 0.0
        self._last = time.perf_counter()

    def lap(self, kind: str) -> None:
        now = time.perf_counter()
        setattr(self, kind, getattr(self, kind) + now - self._last)
        self._last = now
