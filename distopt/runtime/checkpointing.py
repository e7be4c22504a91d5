"""Checkpoints during training: workers write their shards in the background, the driver
writes the manifest once the step has committed and every shard is on disk.

Worker side (:class:`ShardWriter`): at a checkpoint step a thread starts writing the rank's
state shard and slice of the parameters while training goes on. On CPU it reads them in
place, and only what it has not read when the next update comes is copied
(:mod:`distopt.runtime.live_shard`); on GPU they are copied on the device first. Rank 0's
model buffers are always copied. Finished file records ride back on the next step
reports. Driver side (:class:`Coordinator`): the manifest, written last, makes the
checkpoint complete; older ones are pruned.
"""
from __future__ import annotations

import os
import queue
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from distopt import checkpoint as ckpt
from distopt.checkpoint.format import MANIFEST, PARAM_FIELD
from distopt.optim import state_io
from distopt.runtime.live_shard import LiveShard


class ShardWriter:
    """One rank's background checkpoint writes, done in order by one thread of its own.

    The thread is started at the first write and kept: ``Thread.start`` waits until the new
    thread runs, which on cores that training keeps busy costs the checkpoint step a
    scheduler slice every time.
    """

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

        The tensors must be copies nobody changes meanwhile, or pieces of ``live``, whose
        memory must not change before :meth:`freeze`. The thread moves GPU tensors to
        pinned host memory on a stream of its own: training's stream never waits for them.
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

    def _serve(self) -> None:
        _lower_priority()
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
        record: dict = {"step": step, "rank": rank}
        try:
            if made is not None:
                (shard, model), landed = to_host((shard, model), made)
                landed.synchronize()
            folder = ckpt.make_checkpoint_dir(root, step)
            if shard is not None:
                record["shard"] = ckpt.write_shard(folder, rank, shard)
            if model is not None:
                record["model"] = ckpt.write_model(folder, model)
                record["fields"] = fields
        except FileExistsError:
            record["complete"] = True  # a redone step whose checkpoint was already finished
        except Exception as e:  # reported to the driver, which warns and skips this checkpoint
            record["error"] = f"{type(e).__name__}: {e}"
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


def _lower_priority() -> None:
    # Hashing and writing yield to training when they compete for cores; the write
    # deadline (half a checkpoint interval) still bounds how long they may take.
    # Linux applies a nice value to one thread when given its thread id.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: stay at normal priority
        pass


def to_host(parts: tuple, made: "torch.cuda.Event"):
    """``parts`` (dicts of tensors, or None) with CUDA tensors copied to pinned host memory.

    Returns the new parts and a CUDA event that completes when the copies have landed.
    The copies run on a side stream that first waits for ``made`` (the event after which
    the sources, private copies, are complete).
    """
    cuda = [t for part in parts if part for t in part.values() if t.is_cuda]
    side = torch.cuda.Stream(device=cuda[0].device)
    side.wait_event(made)
    with torch.cuda.stream(side):
        moved = tuple(None if part is None else {
            k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True) if v.is_cuda else v
            for k, v in part.items()} for part in parts)
        for t in cuda:
            t.record_stream(side)  # the caching allocator must not reuse a source before its copy
    return moved, side.record_event()


class Buffers:
    """Snapshot memory kept from one checkpoint to the next: a fresh large allocation costs a
    page fault per page on first touch, more than the copy into it."""

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] = {}

    def take(self, key: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor for ``key`` (the kept one when it fits)."""
        buf = self._kept.get(key)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype or buf.device != device:
            buf = self._kept[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf


class Snapshot(NamedTuple):
    """What a checkpoint needs from one rank (see :func:`snapshot`)."""

    shard: dict | None  # field -> copy or live pieces; None on a rank that writes no shard
    model: dict | None  # rank 0: the weights no parameter holds (copies)
    fields: dict | None  # rank 0: the manifest's run description
    live: LiveShard | None  # freeze() it before the shard's memory changes


def snapshot(opt, model: torch.nn.Module, rank: int, seed: int, next_step: int, with_model: bool,
             buffers: Buffers | None = None, live: bool = False) -> Snapshot:
    """What a checkpoint needs from this rank: its shard, and on rank 0 the rest.

    The shard is this rank's state and its slice of the parameters, so the ranks copy the
    weights between them; rank 0 adds what no parameter holds (buffers), always copied,
    since the next forward pass changes them. With ``live`` (CPU only) the shard is not
    copied: it is read in place until ``Snapshot.live.freeze()``, which the caller must run
    before the next update (:mod:`distopt.runtime.live_shard`). Otherwise it is copied now.
    With ``buffers`` the copies go into memory kept from the last snapshot, which must no
    longer be in use (its write finished).
    """
    like = opt._params.data

    def take(key: str, numel: int) -> torch.Tensor:
        if buffers is None:
            return torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffers.take(key, (numel,), like.dtype, like.device)
    state, shard, reader = state_io.state_fields(opt), None, None
    if opt.zero_stage >= 1 or rank == 0:
        parts = {**state, PARAM_FIELD: opt._p_shards}
        if live and like.device.type == "cpu":
            reader = LiveShard(parts, take)
            shard = reader.tensors()
        else:
            shard = {k: torch.cat(ts, out=take(k, sum(t.numel() for t in ts))) for k, ts in parts.items()}
    if not with_model:
        return Snapshot(shard, None, None, reader)
    model_state = model.state_dict()
    fields = ckpt.manifest_fields({**state_io.shard_header(opt), "state": state}, dict(zip(opt.names, opt._tensors)),
                                  seed=seed, next_step=next_step, model_state=model_state)
    # Copied where they live (a GPU copy takes microseconds); the writer thread moves them to host.
    rest = {k: (buffers.take(f"model/{k}", v.shape, v.dtype, v.device).copy_(v) if buffers is not None
                else v.detach().clone()) for k, v in ckpt.model_file_tensors(model_state, fields).items()}
    return Snapshot(shard, rest, fields, reader)


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
