"""Collecting what actors return: ``ray.wait`` against deadlines, failures as data.

:func:`outcomes` turns every rank's end of a call into an :class:`Outcome` (report, dead,
hung, collective or user error), so the policy decides; :func:`gather` is for calls where
the first failure should raise, naming the rank.
"""
from __future__ import annotations

import re
import time

import ray
from ray.exceptions import RayActorError, RayTaskError

from distopt.collectives.base import CollectiveError
from distopt.runtime.config import TrainConfig
from distopt.runtime.errors import TrainingError, WorkerError, WorkerLost
from distopt.runtime.policy import Outcome, WorkerStatus


def outcomes(refs: list, config: TrainConfig, timeouts: int = 1) -> list[Outcome]:
    """One :class:`Outcome` per ref (rank order), collected against the step deadlines.

    After the first failure the others get ``timeouts`` collective timeouts (plus a
    margin) to report before they count as hung.
    """
    rank_of = {ref: r for r, ref in enumerate(refs)}
    ended: dict[int, Outcome] = {}
    deadline = time.monotonic() + config.step_timeout_s
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, left))
        if not done:
            break
        for ref in done:
            outcome = _outcome(ref, rank_of[ref])
            ended[outcome.status.rank] = outcome
            if not outcome.status.ok:
                deadline = min(deadline, time.monotonic() + timeouts * config.collective_timeout_s + 5.0)
    for ref in pending:
        r = rank_of[ref]
        ended[r] = Outcome(WorkerStatus(r, ok=False, hung=True))
    return [ended[r] for r in range(len(refs))]


def gather(refs: list, phase: str, config: TrainConfig, ranks: list[int] | None = None) -> list:
    """Results in order; the first failing rank raises immediately, naming it."""
    ranks = ranks if ranks is not None else list(range(len(refs)))
    rank_of = {ref: r for ref, r in zip(refs, ranks)}
    results, pending = {}, list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=config.step_timeout_s)
        if not done:
            raise TrainingError(f"{phase}: ranks {[rank_of[p] for p in pending]} did not answer within "
                                f"step_timeout_s={config.step_timeout_s:g}")
        for ref in done:
            results[ref] = get(ref, rank_of[ref], phase)
    return [results[ref] for ref in refs]


def _outcome(ref, rank: int) -> Outcome:
    try:
        return Outcome(WorkerStatus(rank), ray.get(ref))
    except RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        if isinstance(cause, CollectiveError):
            return Outcome(WorkerStatus(rank, ok=False, collective_error=str(cause)[:300]), cause=cause)
        return Outcome(WorkerStatus(rank, ok=False, user_error=_headline(e, cause)), cause=e)
    except RayActorError as e:
        return Outcome(WorkerStatus(rank, ok=False, dead=True), cause=e)


def get(ref, rank: int, phase: str):
    """``ray.get``; a failure raises WorkerError (user code) or WorkerLost (the actor died)."""
    try:
        return ray.get(ref)
    except RayTaskError as e:
        raise _worker_error(e, rank, phase) from None
    except RayActorError as e:
        raise WorkerLost(rank, phase, str(e).strip().splitlines()[0] if str(e).strip() else "actor died") from None


def _headline(e: RayTaskError, cause: BaseException | None) -> str:
    return f"{type(cause).__name__}: {cause}" if cause is not None else "see the traceback"


def _worker_error(e: RayTaskError, rank: int, phase: str) -> WorkerError:
    cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
    trace = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    return WorkerError(rank, phase, f"{_headline(e, cause)}\n\nworker traceback:\n{trace}", cause)


def worker_error(outcome: Outcome, phase: str) -> WorkerError:
    """The exception to raise for a user error reported in ``outcome``."""
    if isinstance(outcome.cause, RayTaskError):
        return _worker_error(outcome.cause, outcome.status.rank, phase)
    return WorkerError(outcome.status.rank, phase, outcome.status.user_error or "failed", outcome.cause)
