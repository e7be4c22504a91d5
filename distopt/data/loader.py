"""Loading in the background: loader processes that prepare a rank's next steps while the
current one computes.

A torch ``DataLoader`` runs ``num_data_workers`` processes over :class:`StepStream`, which
yields the rank's micro-batches step after step from a start (step, read position); loader
process ``w`` of ``W`` makes steps ``start + w``, ``start + w + W``, ..., and the DataLoader
hands them back in step order, ``prefetch`` per process ahead. A stream (an ``IterableDataset``, Ray Data) is read by one loader process:
it has no random access, so a second would have to read everything the first does. A
thread of the rank's process takes each batch from the loader processes as soon as it is
ready, and pins it when the rank computes on a GPU (the hand-over, about a millisecond, then
overlaps the step instead of delaying it).
"""
from __future__ import annotations

import queue
import threading
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distopt.data.errors import LoaderDied
from distopt.data.positions import Position
from distopt.data.samples import map_tensors


class StepStream(IterableDataset):
    """A rank's steps from ``start`` on: ``{"step", "position", "next", "batches"}`` dicts."""

    def __init__(self, source: Any, start: int, position: Position | None, rank: int, world_size: int) -> None:
        self.source, self.start, self.position, self.rank, self.world_size = source, start, position, rank, world_size

    def __iter__(self):
        info = get_worker_info()
        me, every = (info.id, info.num_workers) if info is not None else (0, 1)
        step, position = self.start, self.position
        while True:
            if (step - self.start) % every == me:
                batches, after = self.source.batches(step, position, self.rank, self.world_size)
                yield {"step": step, "position": position, "next": after, "batches": batches}
            else:  # another loader process makes this step: only its end position is needed here
                after = self.source.next_position(step, position)
            step, position = step + 1, after


class Prefetcher:
    """The background loader of one rank; restarted wherever the steps asked for jump."""

    def __init__(self, source: Any, num_data_workers: int, prefetch: int, pin_memory: bool) -> None:
        self.source, self.prefetch, self.pin_memory = source, prefetch, pin_memory
        self.workers = num_data_workers if source.cheap_positions else 1
        self._it: Any = None
        self._expect: tuple | None = None  # (step, position, rank, world size) the loader makes next

    def get(self, step: int, position: Position | None, rank: int, world_size: int) -> tuple[list, Position | None]:
        """Step ``step``'s micro-batches and the position after it.

        Raises:
            LoaderDied: a loader process died.
            Exception: what the dataset raised in a loader process (its message kept).
        """
        if self._it is None or self._expect != (step, position, rank, world_size):
            self.close()
            loader = DataLoader(StepStream(self.source, step, position, rank, world_size), batch_size=None,
                                num_workers=self.workers, prefetch_factor=self.prefetch)
            self._it = Receiver(loader, self.prefetch, self.pin_memory)
        try:
            item = self._it.get()
        except BaseException:
            self.close()
            raise
        self._expect = (step + 1, item["next"], rank, world_size)
        return item["batches"], item["next"]

    def close(self) -> None:
        """Stop the loader processes."""
        it, self._it, self._expect = self._it, None, None
        if it is not None:
            it.close()


class Receiver:
    """Iterates a ``DataLoader`` on a thread of its own, keeping up to ``depth`` items ready
    (their tensors in pinned memory with ``pin``)."""

    def __init__(self, loader: DataLoader, depth: int, pin: bool = False) -> None:
        self._pin = pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._it: Any = None
        self._thread = threading.Thread(target=self._serve, args=(loader,), name="data-receiver", daemon=True)
        self._thread.start()

    def _serve(self, loader: DataLoader) -> None:
        # The loader processes start here, off the main thread: torch then installs no SIGCHLD
        # handler, which would raise a loader's death wherever the main thread happens to be;
        # the death is seen here instead (within the DataLoader's 5 s status check) and handed on.
        try:
            it = iter(loader)
        except BaseException as e:
            self._queue.put((False, e))
            return
        with self._lock:
            self._it = it
        if self._stop.is_set():
            self._shut()
        while not self._stop.is_set():
            try:
                item = next(it)
                item = (True, map_tensors(item, torch.Tensor.pin_memory) if self._pin else item)
            except BaseException as e:  # (a dead loader process, the dataset's error): the caller raises it
                item = (False, _death(it, e))
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return

    def get(self) -> Any:
        """The next item; what the loader raised is raised here."""
        ok, value = self._queue.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the thread and the loader processes (the thread exits once its wait ends)."""
        self._stop.set()
        self._shut()

    def _shut(self) -> None:
        with self._lock:
            it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _death(it: Any, error: BaseException) -> BaseException:
    """``error``, or :class:`LoaderDied` when a loader process is gone: a death shows up as
    whatever the hand-over was doing (the DataLoader's own report, a reset connection while
    fetching a batch's shared memory from the dead process)."""
    dead = []
    for w in getattr(it, "_workers", []):
        w.join(timeout=0.5)  # (a live one just waits out the timeout; this is the failure path)
        if w.exitcode is not None:
            dead.append((w.pid, w.exitcode))
    if not dead and not str(error).startswith("DataLoader worker (pid"):
        return error
    died = LoaderDied(f"background loader process(es) (pid, exit code) {dead} died: {type(error).__name__}: {error}")
    died.__cause__ = error
    return died
