"""Checkpoints during training: workers write their shards in the background, the driver
writes the manifest once the step has committed and every shard is on disk.

Worker side: at a checkpoint step the rank's writer starts writing its state shard and
slice of the parameters (:mod:`distopt.runtime.snapshots` says which) while training goes
on. Each device kind has one writer. A CPU rank's is :class:`ShardWriter`, a thread that
reads the shard in place, where only what it has not read when the next update comes is
copied (:mod:`distopt.runtime.live_shard`). A GPU rank's is a writer process that takes a
device copy (:mod:`distopt.runtime.writer_process`); :class:`ShardWriter` refuses CUDA
tensors. Rank 0's model buffers are always copied. Finished file records ride back on the
next step reports. Driver side (:class:`Coordinator`): the manifest, written last, makes the
checkpoint complete; older ones are pruned.
"""
from __future__ import annotations

import os
import queue
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from distopt import checkpoint as ckpt
from distopt.checkpoint.format import MANIFEST
from distopt.runtime.live_shard import LiveShard


class ShardWriter:
    """A CPU rank's background checkpoint writes, done in order by one thread of its own.

    The thread is started at the first write and kept: ``Thread.start`` waits until the new
    thread runs, which on cores that training keeps busy costs the checkpoint step a
    scheduler slice every time.
    """

    reads_live = True  # start() may take a CPU shard read in place (LiveShard)

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending: list[tuple[int, threading.Event]] = []  # (step, set once written)
        self._done: list[dict] = []
        self._lock = threading.Lock()
        self._live: list[tuple[threading.Event, LiveShard]] = []

    def start(self, root: str, step: int, rank: int, shard: dict | None, model: dict | None,
              fields: dict | None, live: LiveShard | None = None) -> None:
        """Write ``shard`` (flat state and parameter slice) and ``model`` for ``step`` in the
        background, after any write started before it.

        The tensors must be CPU tensors: copies nobody changes meanwhile, or pieces of
        ``live``, whose memory must not change before :meth:`freeze`.

        Raises:
            TypeError: a tensor is not on the CPU (a GPU rank's checkpoints go through the
                writer process, :class:`distopt.runtime.writer_process.ProcessWriter`).
        """
        _refuse_device_tensors(shard, model)
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="ckpt-writer", daemon=True)
            self._thread.start()
        written = threading.Event()
        self._jobs.put(((root, step, rank, shard, model, fields), written))
        self._pending.append((step, written))
        if live is not None:
            self._live.append((written, live))

    def reserve(self, nbytes: int, device: torch.device) -> None:
        """Nothing to prepare: the thread reads CPU tensors where they are."""

    def advance(self, seconds: float) -> None:
        """Nothing to pace: no copy to the host is needed."""

    def _serve(self) -> None:
        lower_priority()
        while (job := self._jobs.get()) is not None:
            args, written = job
            try:
                self._write(*args)
            finally:
                written.set()  # whatever happened, nobody may wait for this write forever

    def close(self) -> None:
        """Stop the thread once the writes already started are done (it does not wait)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def freeze(self) -> None:
        """Before the rank's shard changes: every write still reading it in place takes
        copies of what it has not read yet."""
        for written, live in self._live:
            if not written.is_set():  # a finished or failed write reads nothing more
                try:
                    live.freeze()
                except Exception:  # (out of memory): that write fails and says why, training goes on
                    pass
        self._live = []

    def _write(self, root: str, step: int, rank: int, shard: dict | None, model: dict | None,
               fields: dict | None) -> None:
        record = write_files(root, step, rank, shard, model)
        if "model" in record:
            record["fields"] = fields
        with self._lock:
            self._done.append(record)

    def busy(self) -> bool:
        """Whether a write is still queued or running (its tensors are still being read)."""
        return any(not written.is_set() for _, written in self._pending)

    def drain(self, wait: bool = False, before: int | None = None) -> list[dict]:
        """Records of the writes finished so far.

        ``wait`` waits for every write first; ``before`` for those of steps before it, so a
        write overlaps at most the step after its own and its record is never lost with a
        worker that dies later.
        """
        for step, written in self._pending:
            if wait or (before is not None and step < before):
                written.wait()
        self._pending = [(s, written) for s, written in self._pending if not written.is_set()]
        with self._lock:
            done, self._done = self._done, []
        return done


def write_files(root: str, step: int, rank: int, shard: dict | None, model: dict | None) -> dict:
    """Write one rank's files of the checkpoint of ``step``: its record for the driver.

    The record holds the shard's and the model file's records, or ``complete`` (a redone
    step whose checkpoint was already finished), or the ``error`` that stopped the write
    (the driver then warns and skips this checkpoint).
    """
    record: dict = {"step": step, "rank": rank}
    try:
        folder = ckpt.make_checkpoint_dir(root, step)
        if shard is not None:
            record["shard"] = ckpt.write_shard(folder, rank, shard)
        if model is not None:
            record["model"] = ckpt.write_model(folder, model)
    except FileExistsError:
        record["complete"] = True
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
    return record


def _refuse_device_tensors(*parts: dict | None) -> None:
    for part in parts:
        for name, t in (part or {}).items():
            if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                raise TypeError(f"ShardWriter writes CPU tensors, got {name!r} on {t.device}: a GPU rank's "
                                "checkpoints go through the writer process (distopt.runtime.writer_process."
                                "ProcessWriter, which make_writer gives a GPU rank that checkpoints)")


def lower_priority() -> None:
    # Hashing and writing yield to training when they compete for cores; the write
    # deadline (half a checkpoint interval) still bounds how long they may take.
    # Linux applies a nice value to one thread when given its thread id.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: stay at normal priority
        pass


class Coordinator:
    """Driver side: collect records per step; finish a checkpoint once its step committed."""

    def __init__(self, root: str, keep_last: int,
                 on_written: Callable[[int, str], None] = lambda step, path: None) -> None:
        self.root, self.keep_last, self.on_written = root, keep_last, on_written
        self.records: dict[int, dict[int, dict]] = {}
        self.written: list[int] = []

    def add(self, records: list[dict]) -> None:
        """Take file records reported by workers."""
        for r in records:
            self.records.setdefault(r["step"], {})[r["rank"]] = r

    def finish(self, committed_step: int) -> None:
        """Write the manifest of every checkpoint at or before ``committed_step`` that is whole:
        every shard of the plan that wrote it (rank 0's record names it; the group may have
        shrunk or grown since)."""
        for step in sorted(s for s in self.records if s <= committed_step):
            recs = self.records[step]
            errors = [r["error"] for r in recs.values() if "error" in r]
            if errors:
                warnings.warn(f"checkpoint of step {step} abandoned: {errors[0]}")
                del self.records[step]
                continue
            if any(r.get("complete") for r in recs.values()):
                del self.records[step]
                continue
            if "fields" not in recs.get(0, {}):
                continue  # still being written
            head = recs[0]
            shard_ranks = head["fields"]["plan"]["world_size"]
            if any(r not in recs or "shard" not in recs[r] for r in range(shard_ranks)):
                continue
            shards = [recs[r]["shard"] for r in range(shard_ranks)]
            folder = ckpt.step_dir(self.root, step)
            ckpt.write_manifest(folder, ckpt.build_manifest(step, head["fields"], head["model"], shards))
            self.written.append(step)
            del self.records[step]
            ckpt.prune(self.root, self.keep_last)
            self.on_written(step, str(folder))

    def forget_after(self, committed_step: int) -> None:
        """Drop records of steps that never committed (a failed attempt's writes)."""
        for step in [s for s in self.records if s > committed_step]:
            del self.records[step]


def load_for_resume(path: str) -> ckpt.Checkpoint:
    """The checkpoint to resume from: ``path`` itself, or the newest that verifies under it.

    Raises:
        CheckpointError: ``path`` is a damaged checkpoint, or a root with none that verifies.
    """
    p = Path(path)
    if (p / MANIFEST).exists():
        ckpt.verify(p)
        return ckpt.load_checkpoint(p)
    good, skipped = ckpt.latest_valid(p)
    return ckpt.load_checkpoint(good)
