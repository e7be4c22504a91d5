"""Checkpoints during training: workers write their shards in the background, the driver
writes the manifest once the step has committed and every shard is on disk.

Worker side (:class:`ShardWriter`): at a checkpoint step a thread starts writing the rank's
state shard and slice of the parameters (:mod:`distopt.runtime.snapshots` says which, and
copies them) while training goes on. On CPU it reads them in
place, and only what it has not read when the next update comes is copied
(:mod:`distopt.runtime.live_shard`). On GPU they are copied on the device first (one
launch); a writer process takes them from there where the host has one
(:mod:`distopt.runtime.writer_process`), else the thread brings the copy to the host a few
MiB at a time (:class:`DevicePieces`). Rank 0's model buffers are always copied. Finished
file records ride back on the next step reports. Driver side (:class:`Coordinator`): the manifest,
written last, makes the checkpoint complete; older ones are pruned.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator

import torch

from distopt import checkpoint as ckpt
from distopt.checkpoint.format import MANIFEST
from distopt.runtime.live_shard import LiveShard

STAGING_BYTES = 4 * 2**20  # one device-to-host piece: short enough that training's own small
# copies to the host (a loss, a norm) never queue long behind one on the copy engine


class ShardWriter:
    """One rank's background checkpoint writes, done in order by one thread of its own.

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
        self._staging: dict[torch.device, Staging] = {}  # the thread's own, per device

    def start(self, root: str, step: int, rank: int, shard: dict | None, model: dict | None,
              fields: dict | None, live: LiveShard | None = None) -> None:
        """Write ``shard`` (flat state and parameter slice) and ``model`` for ``step`` in the
        background, after any write started before it.

        The tensors must be copies nobody changes meanwhile, or pieces of ``live``, whose
        memory must not change before :meth:`freeze`. The thread moves GPU tensors to the
        host piece by piece on a stream of its own (:class:`DevicePieces`): training's
        stream never waits for them.
        """
        on_gpu = [t.device for part in (shard, model) if part for t in part.values()
                  if isinstance(t, torch.Tensor) and t.is_cuda]
        made = torch.cuda.current_stream(on_gpu[0]).record_event() if on_gpu else None  # the copies are queued there
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="ckpt-writer", daemon=True)
            self._thread.start()
        written = threading.Event()
        self._jobs.put(((root, step, rank, shard, model, fields, made), written))
        self._pending.append((step, written))
        if live is not None:
            self._live.append((written, live))

    def reserve(self, nbytes: int, device: torch.device) -> None:
        """Nothing to prepare: the thread's staging is two small pieces."""

    def advance(self, seconds: float) -> None:
        """Nothing to pace: the thread moves GPU copies to the host itself."""

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
               fields: dict | None, made=None) -> None:
        try:
            if made is not None:
                shard, model = self._from_device((shard, model), made)
            record = write_files(root, step, rank, shard, model)
        except Exception as e:  # (pinned staging out of memory): as a failed write
            record = {"step": step, "rank": rank, "error": f"{type(e).__name__}: {e}"}
        if "model" in record:
            record["fields"] = fields
        with self._lock:
            self._done.append(record)

    def _from_device(self, parts: tuple, made: "torch.cuda.Event") -> tuple:
        # Big-endian hosts (none has CUDA) would need the words swapped: tensor_bytes does that.
        if sys.byteorder != "little":
            return parts
        cuda = [t for part in parts if part for t in part.values() if t.is_cuda]
        device = cuda[0].device
        if device not in self._staging:
            self._staging[device] = Staging(device)
        staging = self._staging[device]
        staging.stream.wait_event(made)  # the sources are complete once training's stream passed it
        with torch.cuda.stream(staging.stream):  # (where a source must be made contiguous first)
            return tuple(None if part is None else {k: DevicePieces(v.contiguous(), staging) if v.is_cuda else v
                                                    for k, v in part.items()} for part in parts)

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


def lower_priority() -> None:
    # Hashing and writing yield to training when they compete for cores; the write
    # deadline (half a checkpoint interval) still bounds how long they may take.
    # Linux applies a nice value to one thread when given its thread id.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: stay at normal priority
        pass


class Staging:
    """Two pinned host buffers, their events and a side stream, through which one writer
    thread moves GPU tensors to the host: kept for the writer's life, so a checkpoint pins
    no memory of its own and makes no stream or event."""

    def __init__(self, device: torch.device, piece_bytes: int = STAGING_BYTES) -> None:
        self.stream = torch.cuda.Stream(device=device)
        self.size = piece_bytes
        self.slots = [torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.host = [memoryview(slot.numpy()) for slot in self.slots]
        self.landed = [torch.cuda.Event(), torch.cuda.Event()]


class DevicePieces:
    """A contiguous CUDA tensor given to the checkpoint writer as host bytes, piece by piece
    (:class:`distopt.checkpoint.writer.Pieces`).

    Piece ``i + 1`` is copied into one staging buffer on the side stream while piece ``i``,
    in the other, is hashed and written. Each copy is one piece long, so a small copy of
    training's to the host waits for at most one piece on the copy engine, where a whole
    shard copied at once held it for milliseconds; and the pinned memory is two pieces,
    not the shard. The source must be complete when the side stream reaches the copies
    (the writer makes it wait for the checkpoint step's event first) and must not change
    until the write is done: it is a private copy.
    """

    def __init__(self, t: torch.Tensor, staging: Staging) -> None:
        if not t.is_cuda or not t.is_contiguous():
            raise ValueError("DevicePieces reads a contiguous CUDA tensor")
        self.dtype, self.shape, self._t, self._staging = t.dtype, tuple(t.shape), t, staging

    def pieces(self) -> Iterator[memoryview]:
        """The tensor's bytes (little-endian: the device's order on every CUDA host)."""
        st, flat = self._staging, self._t.reshape(-1).view(torch.uint8)
        size, n = st.size, flat.numel()
        count = -(-n // size)

        def fetch(i: int) -> None:
            lo, hi = i * size, min(i * size + size, n)
            slot = st.slots[i % 2] if hi - lo == size else st.slots[i % 2][: hi - lo]
            with torch.cuda.stream(st.stream):
                slot.copy_(flat[lo:hi], non_blocking=True)
                st.landed[i % 2].record()
        if count:
            fetch(0)
        for i in range(count):
            if i + 1 < count:
                fetch(i + 1)  # into the slot of piece i - 1, which the writer has consumed by now
            st.landed[i % 2].synchronize()
            yield st.host[i % 2][: min(size, n - i * size)]


class Coordinator:
    """Driver side: collect records per step; finish a checkpoint once its step committed."""

    def __init__(self, root: str, keep_last: int) -> None:
        self.root, self.keep_last = root, keep_last
        self.records: dict[int, dict[int, dict]] = {}
        self.written: list[int] = []

    def add(self, records: list[dict]) -> None:
        """Take file records reported by workers."""
        for r in records:
            self.records.setdefault(r["step"], {})[r["rank"]] = r

    def finish(self, committed_step: int, shard_ranks: int) -> None:
        """Write the manifest of every checkpoint at or before ``committed_step`` that is whole."""
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
            if 0 not in recs or any(r not in recs or "shard" not in recs[r] for r in range(shard_ranks)):
                continue  # still being written
            head = recs[0]
            shards = [recs[r]["shard"] for r in range(shard_ranks)]
            folder = ckpt.step_dir(self.root, step)
            ckpt.write_manifest(folder, ckpt.build_manifest(step, head["fields"], head["model"], shards))
            self.written.append(step)
            del self.records[step]
            ckpt.prune(self.root, self.keep_last)

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
