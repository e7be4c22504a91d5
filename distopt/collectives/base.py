"""The collective contract every backend implements, and its shared geometry.

Every method is a collective: all ranks of the group call it, in the same order, with
tensors of the same dtype and (where stated) the same size. A failed or timed-out call
raises :class:`CollectiveError` on every rank that sees it; the group is then broken and
must be replaced by a new communicator (the callers' recovery path), never reused.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

OPS = ("sum", "mean")


class CollectiveError(RuntimeError):
    """A collective failed: a peer died, timed out or never joined.

    Recovery: tear the communicator down (``close()``) and form a new group; the tensors
    passed to the failed call hold unspecified values.
    """


@runtime_checkable
class Communicator(Protocol):
    """One rank's handle on a group of ``world_size`` ranks."""

    rank: int
    world_size: int

    def allreduce(self, t: torch.Tensor, op: str = "sum", wire_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reduce ``t`` over all ranks in place and return it."""

    def reduce_scatter(
        self, flat: torch.Tensor, op: str = "sum", wire_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reduce ``flat`` over all ranks and return this rank's chunk (see :func:`chunk_range`)."""

    def allgather(self, shard: torch.Tensor, numel: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate every rank's shard in rank order."""

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Chunk ``j`` of the result is chunk ``rank`` of rank ``j``'s ``t``."""

    def shift(self, t: torch.Tensor, out: torch.Tensor | None = None, distance: int = 1) -> torch.Tensor:
        """Send ``t`` to rank ``rank + distance``; return what rank ``rank - distance`` sent."""

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` with rank ``src``'s values and return it."""

    def barrier(self) -> None:
        """Return once every rank has called it."""

    def close(self) -> None:
        """Release the group; safe to call more than once and after a failure."""


def chunk_numel(numel: int, world_size: int) -> int:
    """Size of each rank's chunk when ``numel`` elements are split over ``world_size`` ranks.

    Chunks are ``ceil(numel / world_size)`` long; the last ones are shorter (or empty) when
    ``numel`` is not divisible, which the backends handle by zero padding on the wire.
    """
    return -(-numel // world_size)


def chunk_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """The ``[start, end)`` of ``rank``'s chunk of a flat tensor of ``numel`` elements."""
    c = chunk_numel(numel, world_size)
    return min(rank * c, numel), min((rank + 1) * c, numel)


def check_op(op: str, dtype: torch.dtype) -> None:
    """Validate a reduction name before any communication starts."""
    if op not in OPS:
        raise ValueError(f"op={op!r} is not supported: use one of {OPS}")
    if op == "mean" and not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"op='mean' needs a floating-point tensor, got {dtype}: use op='sum' or cast with .float()")


def check_wire_dtype(wire_dtype: torch.dtype | None, dtype: torch.dtype) -> None:
    """Wire compression only narrows float tensors to bf16/fp16."""
    if wire_dtype is None or wire_dtype == dtype:
        return
    if wire_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"wire_dtype={wire_dtype} is not supported: use torch.bfloat16, torch.float16 or None")
    if not dtype.is_floating_point:
        raise TypeError(f"wire compression needs a floating-point tensor, got {dtype}: pass wire_dtype=None")
