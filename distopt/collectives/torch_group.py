"""The machinery under :class:`~distopt.collectives.torch_dist.TorchCommunicator`'s collectives.

Every collective is started with a sequence tag (the same on every rank, as every rank
calls collectives in the same order) and waited for through a
:class:`~distopt.collectives.pending.Pending`; a failure makes the group unusable and
becomes a :class:`CollectiveError`. Device tensors on gloo cross through host memory, and
``"mean"`` divides before the sum where a low-precision sum could overflow.
"""
from __future__ import annotations

import datetime
from typing import Callable

import torch

from distopt.collectives.base import CollectiveError
from distopt.collectives.pairwise import Pairwise
from distopt.collectives.pending import Pending

# Low-precision sums can overflow before the division, so those are divided first.
_PREDIVIDE = (torch.float16, torch.bfloat16)


class TorchGroup:
    """A torch.distributed process group's state and the calls on it (the base of
    :class:`~distopt.collectives.torch_dist.TorchCommunicator`)."""

    def _setup(self, rank: int, world_size: int, backend: str, timeout_s: float | None, local: bool) -> None:
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self._timeout = None if timeout_s is None else datetime.timedelta(seconds=self.timeout_s)
        # gloo's wait takes the deadline itself. NCCL's wait with a deadline blocks the host
        # until the GPU is done (polling every millisecond), so NCCL waits are stream-ordered
        # and the group's watchdog enforces the same timeout_s.
        self._wait_timeout = self._timeout if backend == "gloo" else None
        self._broken: str | None = None
        self._seq = 0
        self._pairwise = Pairwise(rank, world_size)  # gloo's reduce-scatter and allgather
        self._store = None
        self._pg = None
        self._owns_group = True  # False for a wrapped group: close() must leave it to its owner
        self._local = local

    def _staged(self, t: torch.Tensor) -> bool:
        # gloo's point-to-point calls read raw host pointers, so device tensors (several
        # ranks sharing one GPU) cross through host memory; NCCL takes them as they are.
        return self.backend == "gloo" and t.device.type != "cpu"

    def _via_host(self, t: torch.Tensor, start: Callable[[torch.Tensor], Pending], out: torch.Tensor | None,
                  async_op: bool):
        """Run a collective on a host copy of ``t``; its result lands in ``out`` or on ``t``'s device."""
        pending = start(t.cpu())  # synchronises with the stream that produced t

        def finish() -> torch.Tensor:
            result = pending.wait()
            return out.copy_(result) if out is not None else result.to(t.device)
        return self._finish(pending.name, [], finish, async_op)

    def _run(self, name: str, start: Callable[[int], object]) -> None:
        """Start a collective (``start(tag)`` returns one work or a list) and wait for it."""
        self._finish(name, self._start(name, start), lambda: None, False)

    def _start(self, name: str, start: Callable[[int], object]) -> list:
        if self._broken is not None or self._pg is None:
            raise CollectiveError(f"{name} on rank {self.rank}: this group is unusable ({self._broken}); "
                                  f"close() it and form a new communicator")
        self._seq += 1  # every rank calls collectives in the same order: the same tag everywhere
        try:
            works = start(self._seq)
        except Exception as e:
            raise self._failed(name, e) from e
        return works if isinstance(works, list) else [works]

    def _finish(self, name: str, works: list, finish: Callable[[], object], async_op: bool):
        pending = Pending(self, name, works, finish)
        return pending if async_op else pending.wait()

    def _failed(self, name: str, e: BaseException) -> CollectiveError:
        self._broken = f"{name} failed: {first_line(e)}"
        return CollectiveError(
            f"{name} failed on rank {self.rank} of {self.world_size} ({self.backend}, timeout "
            f"{'unknown' if self.timeout_s is None else f'{self.timeout_s:g}s'}): {first_line(e)}. "
            f"A peer died, stalled or left; form a new group")

    def _prescale(self, t: torch.Tensor, op: str) -> None:
        if op == "mean" and t.dtype in _PREDIVIDE:
            t.div_(self.world_size)

    def _postscale(self, t: torch.Tensor, op: str) -> None:
        if op == "mean" and t.dtype not in _PREDIVIDE:
            t.div_(self.world_size)


def check_contiguous(t: torch.Tensor, name: str) -> None:
    """Raise ValueError unless ``t`` is contiguous (``name``: the collective)."""
    if not t.is_contiguous():
        raise ValueError(f"{name} needs a contiguous tensor: call .contiguous() first")


def check_flat(t: torch.Tensor, name: str) -> None:
    """Raise ValueError unless ``t`` is contiguous and 1-D (``name``: the collective)."""
    check_contiguous(t, name)
    if t.dim() != 1:
        raise ValueError(f"{name} takes a 1-D tensor, got shape {tuple(t.shape)}: pass t.view(-1)")


def padded(t: torch.Tensor, numel: int) -> torch.Tensor:
    """A zero-padded copy of 1-D ``t`` with ``numel`` elements."""
    out = t.new_zeros(numel)
    out[: t.numel()].copy_(t)
    return out


def deliver(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result``, or ``out`` holding it (no copy where ``out`` is ``result``).

    Raises:
        ValueError: ``out`` has another size.
    """
    if out is None or out.data_ptr() == result.data_ptr() and out.numel() == result.numel():
        return result if out is None else out
    if out.numel() != result.numel():
        raise ValueError(f"out has {out.numel()} elements, the result has {result.numel()}")
    return out.copy_(result)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for our own messages."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
