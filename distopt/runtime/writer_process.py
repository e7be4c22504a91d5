"""Checkpoint writes in a process of their own: the one writer of a rank whose shard lives
on a GPU.

A writer thread shares the training process's GIL. When a step is mostly Python and kernel
launches (a few milliseconds on a GPU), each bit of the thread's Python (a piece's copy and
event, a folder, a file) held up training's next op, and the checkpoint step paid 10-20%
(the thread's GPU path, measured against this one in ``benchmarks/RESULTS.md``, is gone).
Here the training thread moves the snapshot into pinned shared memory itself, and a writer
process hashes, writes, fsyncs and renames; it never touches CUDA.

The copy to the host goes in pieces, one at the start of each step, sized to land within
about half a step at the bandwidth the last piece reached: a copy queued on the copy engine
holds up every later device-to-host copy of training's (the loss it reads at the end of the
step) until it is done, however it is split, so no more than one step's piece may be in
flight. Once the last piece has landed the writer process gets a short message.

The shared memory (a memfd both processes map; no /dev/shm size limit applies) holds one
snapshot and is kept from one checkpoint to the next: a checkpoint that starts while the
last one is still being written first waits for it; where each tensor goes in it is
:mod:`distopt.runtime.host_snapshot`. The writer process's side is
:mod:`distopt.runtime.writer_main`; starting it and talking to it,
:mod:`distopt.runtime.writer_channel`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import msgpack
import torch

from distopt.runtime.checkpointing import ShardWriter
from distopt.runtime.host_snapshot import Placement, SharedMemory, bytes_of, join_runs
from distopt.runtime.writer_channel import WriterChannel
from distopt.runtime.writer_main import MESSAGE_BYTES

FIRST_PIECE = 8 * 2**20  # before any piece has measured the rate
MIN_PIECE, MAX_PIECE = 2**20, 512 * 2**20
RESERVE_SLACK = 4 * 2**20  # alignment and rank 0's model buffers, beyond the shard


def available() -> bool:
    """Whether this host can run the writer process (Linux memfd; little-endian bytes)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds") and sys.byteorder == "little"


@dataclass
class _Job:
    step: int
    rank: int
    message: bytes
    fields: dict | None
    todo: list = field(default_factory=list)  # [(CUDA bytes, offset)] still to copy to the shared memory
    ready: "torch.cuda.Event | None" = None  # training's stream has made the CUDA sources here
    piece: tuple | None = None  # (start event, end event, bytes) of the copies last queued
    sources: list = field(default_factory=list)  # alive until the side stream has read them


class _Lane(NamedTuple):
    """One device's side stream for copies to the host, and its events, made once."""

    stream: torch.cuda.Stream
    ready: torch.cuda.Event  # training's stream has made a job's sources
    start: torch.cuda.Event  # a piece's copies start
    end: torch.cuda.Event  # and have landed


class ProcessWriter(WriterChannel):
    """One rank's background checkpoint writes, done in order by a writer process.

    The same calls as :class:`distopt.runtime.checkpointing.ShardWriter`. ``start`` takes
    copies nobody changes until they have reached the host (see :meth:`busy`), which CUDA
    copies do piece by piece as :meth:`advance` is called, once per step. The process is
    started at construction and the shared memory made by :meth:`reserve`, so neither
    costs a training step.
    """

    reads_live = False  # it takes copies, never a shard read in place

    def __init__(self) -> None:
        if not available():
            raise RuntimeError("the checkpoint writer process needs Linux (memfd) and a little-endian host")
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._memory: SharedMemory | None = None
        self._mapped = False  # whether the current process has mapped self._memory
        self._lanes: dict[int, _Lane] = {}  # by device index
        self._packer = msgpack.Packer()  # msgpack.packb makes a Packer, with its buffer, per call
        self._copying: list[_Job] = []  # being copied to the host; not yet sent
        self._rate: float | None = None  # bytes per second the last piece reached
        self._writing: list[_Job] = []  # sent; record not back yet
        self._done: list[dict] = []
        self._layout: Placement | None = None  # the last snapshot's, which the next one is like
        self._inbox = bytearray(MESSAGE_BYTES)
        self._spawn()

    def start(self, root: str, step: int, rank: int, shard: dict | None, model: dict | None,
              fields: dict | None, live: object = None) -> None:
        """Write ``shard`` and ``model`` (name -> tensor, any device) for ``step`` in the
        background, after any write started before it.

        CUDA tensors are copied to the host on a side stream once training's stream has
        passed this point; CPU tensors are copied now. Either way the tensors must not
        change until :meth:`busy` says so.
        """
        if live is not None:
            raise ValueError("ProcessWriter takes copies, not a shard read in place: pass live=None")
        if self._copying or self._writing:
            self._finish(lambda _: True)  # the shared memory holds one snapshot
        if self._proc is None:
            self._spawn()
        layout = self._layout_of(shard, model)
        message = {"root": str(root), "step": step, "rank": rank, **layout.fields}
        memory = self._shared(layout.size, layout.cuda)
        job = _Job(step, rank, self._packer.pack(message), fields)
        for t, off in zip(layout.tensors(shard, model), layout.offsets):
            src = bytes_of(t)
            if t.is_cuda:
                job.todo.append((src, off))
                job.sources.append(src)
            else:
                memory.bytes[off: off + src.numel()].copy_(src)
        if job.todo:
            device = job.todo[0][0].get_device()
            job.ready = self._lane(device).ready  # re-recorded only once the last job's copies are queued
            job.ready.record(torch.cuda.current_stream(device))
        self._copying.append(job)
        self._pump()

    def _layout_of(self, shard: dict | None, model: dict | None) -> "Placement":
        layout = self._layout
        if layout is None or not layout.fits(shard, model):
            layout = self._layout = Placement(shard, model)
        return layout

    def reserve(self, nbytes: int, device: torch.device) -> None:
        """Make (and on a GPU pin) the shared memory for a snapshot of about ``nbytes`` now,
        at set-up: pinning takes a while (0.3 s for 600 MB on an H100), which the first
        checkpoint step would pay otherwise."""
        if self._memory is None or self._memory.size < nbytes + RESERVE_SLACK:
            self._finish(lambda _: True)  # copies still on their way land in the memory they started in
            self._shared(nbytes + RESERVE_SLACK, device.type == "cuda")

    def advance(self, seconds: float) -> None:
        """Queue the next piece of a checkpoint's copy to the host: as much as lands in about
        ``seconds`` at the last piece's rate; nothing while the last piece is in flight.

        Call it at the start of a step, with half a step's time: the piece lands while the
        step computes, before the step's own copies to the host.
        """
        if not self._copying or not self._copying[0].todo:
            return
        job = self._copying[0]
        if job.piece is not None:
            start, end, nbytes = job.piece
            if not end.query():
                return
            self._rate = nbytes / max(start.elapsed_time(end) / 1e3, 1e-6)
        budget = FIRST_PIECE if self._rate is None else self._rate * seconds
        self._queue(job, int(min(max(budget, MIN_PIECE), MAX_PIECE)))

    def _queue(self, job: _Job, budget: int) -> None:
        lane = self._lane(job.todo[0][0].get_device())
        if job.ready is not None:  # the job's first piece
            lane.stream.wait_event(job.ready)
            job.ready = None
            job.todo = join_runs(job.todo)  # job.sources keeps the memory of what they read
        # The events are reused: a piece is queued once the last one has landed, or (when
        # waiting for the whole copy) after it on the same stream, so ``end`` marks the newest.
        queued = 0
        lane.start.record(lane.stream)
        with torch.cuda.stream(lane.stream):
            while job.todo and queued < budget:
                src, off = job.todo[0]
                n = min(src.numel(), budget - queued)
                self._memory.bytes[off: off + n].copy_(src[:n], non_blocking=True)
                if n == src.numel():
                    job.todo.pop(0)
                else:
                    job.todo[0] = (src[n:], off + n)
                queued += n
        lane.end.record(lane.stream)
        job.piece = (lane.start, lane.end, queued)

    def _lane(self, device: int) -> "_Lane":
        lane = self._lanes.get(device)
        if lane is None:  # each new event cost a checkpoint step's Python more than a record
            lane = self._lanes[device] = _Lane(torch.cuda.Stream(device=device), torch.cuda.Event(),
                                               torch.cuda.Event(enable_timing=True),
                                               torch.cuda.Event(enable_timing=True))
        return lane

    def _landed(self, job: _Job) -> bool:
        return not job.todo and (job.piece is None or job.piece[1].query())

    def _pump(self) -> None:
        """Send the jobs whose copy has landed; collect the records that came back."""
        while self._copying and self._landed(self._copying[0]):
            self._dispatch()
        while self._writing and self._receive(block=False):
            pass

    def _dispatch(self) -> None:
        job = self._copying.pop(0)
        job.sources = []
        if self._proc is not None and self._send(job.message):
            self._writing.append(job)
        else:
            self._fail([job])

    def _finish(self, which: Callable[[int], bool]) -> None:
        """Wait for the writes of the steps ``which`` picks (and those before them)."""
        while self._copying and any(which(j.step) for j in self._copying):
            job = self._copying[0]
            if job.todo:
                self._queue(job, sum(src.numel() for src, _ in job.todo))
            if job.piece is not None:
                job.piece[1].synchronize()
            self._dispatch()
        while self._writing and any(which(j.step) for j in self._writing):
            if self._proc is None:
                self._lost()
            else:
                self._receive(block=True)

    def busy(self) -> bool:
        """Whether tensors given to :meth:`start` are still being read (copied to the host)."""
        self._pump()
        return bool(self._copying)

    def freeze(self) -> None:
        """Nothing to do: every write reads a copy."""

    def drain(self, wait: bool = False, before: int | None = None) -> list[dict]:
        """Records of the writes finished so far; ``wait`` waits for every write first,
        ``before`` for those of steps before it."""
        self._pump()
        if wait:
            self._finish(lambda _: True)
        elif before is not None:
            self._finish(lambda step: step < before)
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Stop the writer process once the writes already sent are done (it does not wait).

        Copies still on their way to the host are waited for: the shared memory is released.
        """
        for job in self._copying:
            if job.piece is not None:
                job.piece[1].synchronize()
        self._copying = []  # writes not yet copied to the host are dropped
        if self._sock is not None:
            self._sock.close()  # the process finishes what it was sent, then sees the end
        self._sock, self._proc = None, None
        if self._memory is not None:
            self._memory.close()
            self._memory = None


def make_writer(device: torch.device, checkpointing: bool) -> "ProcessWriter | ShardWriter":
    """The checkpoint writer for a rank: the writer process for a GPU rank that writes
    checkpoints, a writer thread (which never gets a GPU tensor) for any other rank.

    Raises:
        RuntimeError: a GPU rank writes checkpoints and this host cannot run the writer
            process (no memfd, or it did not start); nothing has been trained yet.
    """
    if not (checkpointing and device.type == "cuda"):
        return ShardWriter()
    fix = ("run on a little-endian Linux host with memfd_create (Linux >= 3.17), or pass checkpoint_dir=None "
           "to train on the GPU without checkpoints")
    if not available():
        raise RuntimeError(f"checkpoints of a rank on {device} are written by a writer process, which this host "
                           f"cannot run (it shares memory through a memfd): {fix}")
    try:
        return ProcessWriter()
    except OSError as e:
        raise RuntimeError(f"the checkpoint writer process of the rank on {device} did not start ({e}): {fix}") from e
