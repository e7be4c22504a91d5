"""Exceptions the driver raises; one type per thing the user (or a policy) does next."""
from __future__ import annotations


class TrainingError(RuntimeError):
    """Base class of every distopt runtime failure."""


class WorkerError(TrainingError):
    """User code raised inside a worker (model builder, loss, data). Fix the code and rerun.

    Attributes:
        rank: the worker's rank.
        phase: what it was doing (``"setup"``, ``"step 12"``...).
        cause: the original exception when it could be carried across, else None.
    """

    def __init__(self, rank: int, phase: str, message: str, cause: BaseException | None = None) -> None:
        super().__init__(f"worker rank {rank} failed during {phase}: {message}")
        self.rank, self.phase, self.cause = rank, phase, cause


class WorkerLost(TrainingError):
    """A worker process or its node died. Retry the step on a re-formed group."""

    def __init__(self, rank: int, phase: str, message: str) -> None:
        super().__init__(f"worker rank {rank} was lost during {phase}: {message}")
        self.rank, self.phase = rank, phase


class PlacementError(TrainingError):
    """The cluster cannot hold the requested workers. Ask for fewer or add capacity."""


class RunFailed(TrainingError):
    """The run gave up: past ``max_failures``, or no way to go on. ``failures`` has every record."""

    def __init__(self, message: str, failures: list[dict]) -> None:
        super().__init__(message)
        self.failures = failures
