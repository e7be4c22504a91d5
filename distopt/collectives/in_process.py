"""Several ranks in one process: real gloo groups over an in-memory store, one thread a rank.

This is the test bed for everything above the collectives: the same
:class:`TorchCommunicator` code runs here as across processes and machines, only the
rendezvous goes through a ``HashStore`` and the transport through loopback.
"""
from __future__ import annotations

import itertools
import threading
from typing import Callable, Sequence, TypeVar

import torch.distributed as dist

from distopt.collectives.torch_dist import TorchCommunicator

T = TypeVar("T")
_groups = itertools.count()


class RankFailure(RuntimeError):
    """A rank's function raised in :func:`run_ranks`; ``rank`` says which, ``__cause__`` holds it."""

    def __init__(self, rank: int, error: BaseException) -> None:
        super().__init__(f"rank {rank} failed: {type(error).__name__}: {error}")
        self.rank = rank


def in_process(world_size: int, timeout_s: float = 30.0) -> list[TorchCommunicator]:
    """Form a gloo group of ``world_size`` ranks inside this process.

    Returns one communicator per rank; use each from its own thread (see :func:`run_ranks`),
    since every collective blocks until all ranks have called it.

    Raises:
        ValueError: ``world_size < 1``.
        CollectiveError: the group could not be formed within ``timeout_s``.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive int")
    store = dist.HashStore()
    name = f"in_process_{next(_groups)}"

    def build(rank: int) -> TorchCommunicator:
        return TorchCommunicator(rank, world_size, "127.0.0.1", 0, "gloo", timeout_s, store=store, group_name=name)

    return run_ranks(list(range(world_size)), build)


def run_ranks(per_rank: Sequence[T], fn: Callable[[T], object], timeout_s: float | None = None) -> list:
    """Call ``fn(per_rank[r])`` for every ``r`` in its own thread; return results in rank order.

    Raises:
        RankFailure: a rank raised (the lowest failing rank; its exception is chained).
        RuntimeError: a rank did not finish within ``timeout_s``.
    """
    results: list = [None] * len(per_rank)
    errors: list[BaseException | None] = [None] * len(per_rank)

    def body(r: int) -> None:
        try:
            results[r] = fn(per_rank[r])
        except BaseException as e:  # re-raised below in the caller's thread
            errors[r] = e

    threads = [threading.Thread(target=body, args=(r,), daemon=True, name=f"rank{r}") for r in range(len(per_rank))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    if stuck:
        raise RuntimeError(f"ranks {stuck} did not finish within {timeout_s}s")
    for r, e in enumerate(errors):
        if e is not None:
            raise RankFailure(r, e) from e
    return results
