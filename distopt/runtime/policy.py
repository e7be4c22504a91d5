"""The failure policy: a pure function from what the workers reported to what to do next.

No Ray and no cluster: it is tested with made-up status records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence


@dataclass(frozen=True)
class WorkerStatus:
    """How one rank ended a step, as the controller saw it."""

    rank: int
    ok: bool = True  # returned a report
    dead: bool = False  # the process or its node is gone
    hung: bool = False  # alive but missed the step deadline (it will be killed)
    user_error: str | None = None  # user code raised: not something a retry fixes
    collective_error: str | None = None  # a peer failed under it


@dataclass
class Outcome:
    """One rank's end of a step: its report, or how it failed (with the exception, if any)."""

    status: WorkerStatus
    report: Any = None
    cause: BaseException | None = None


class Decision(NamedTuple):
    """``action`` is ``"continue"``, ``"retry"``, ``"replace"``, ``"shrink"`` or ``"fail"``."""

    action: str
    lost: tuple[int, ...]  # ranks to drop (dead or hung)
    world_size: int  # workers after recovery
    reason: str


def lost_ranks(statuses: Sequence[WorkerStatus]) -> tuple[int, ...]:
    """Ranks that must be replaced or dropped."""
    return tuple(s.rank for s in statuses if s.dead or s.hung)


def decide(statuses: Sequence[WorkerStatus], failures_so_far: int, max_failures: int, min_workers: int,
           global_batch_size: int, accumulation: int, can_replace: bool) -> Decision:
    """What to do after a step.

    Args:
        statuses: one record per rank of the step.
        failures_so_far: worker failures already recovered in this run.
        max_failures: worker failures tolerated in a run.
        min_workers: fewest workers a shrink may leave.
        global_batch_size, accumulation: a shrink must keep the global batch divisible.
        can_replace: a replacement worker can be placed now.
    """
    world = len(statuses)
    user = [s for s in statuses if s.user_error]
    if user:
        return Decision("fail", (), world, f"user code raised on rank {user[0].rank}: {user[0].user_error}")
    lost = lost_ranks(statuses)
    if not lost:
        if all(s.ok for s in statuses):
            return Decision("continue", (), world, "every rank reported")
        return Decision("retry", (), world, "a collective failed but every worker is alive: re-form the group")
    if failures_so_far + len(lost) > max_failures:
        return Decision("fail", lost, world, f"{failures_so_far + len(lost)} worker failures exceed "
                                             f"max_failures={max_failures}")
    if can_replace:
        return Decision("replace", lost, world, f"replace ranks {list(lost)}")
    size = shrink_size(world - len(lost), min_workers, global_batch_size, accumulation)
    if size is None:
        return Decision("fail", lost, world, f"no replacement can be placed and {world - len(lost)} survivors cannot "
                                             f"split global_batch_size={global_batch_size} (min_workers={min_workers})")
    return Decision("shrink", lost, size, f"no replacement can be placed: continue on {size} workers")


def shrink_size(survivors: int, min_workers: int, global_batch_size: int, accumulation: int) -> int | None:
    """The most workers, at most ``survivors`` and at least ``min_workers``, that split the batch."""
    return _largest_split(survivors, max(min_workers, 1), global_batch_size, accumulation)


def grow_size(world: int, ready: int, global_batch_size: int, accumulation: int) -> int | None:
    """The most workers, more than ``world`` and at most ``world + ready``, that split the
    batch; None when no such size exists."""
    return _largest_split(world + ready, world + 1, global_batch_size, accumulation)


def _largest_split(most: int, least: int, global_batch_size: int, accumulation: int) -> int | None:
    """The largest worker count in ``[least, most]`` that divides the global batch."""
    for m in range(most, least - 1, -1):
        if global_batch_size % (m * accumulation) == 0:
            return m
    return None
