"""A replica kept by copy and a log of gradients, for ranks that share a host.

Replaying the owner's update on the holder every step costs a second Adam pass per rank
(seven shard-sized memory streams), about as much as the update itself. On one host the
holder can instead *copy* the owner's committed shard, a slice at a time, and rebuild the
replica only when it is needed:

* the owner keeps its optimizer state, and the last ``depth`` averaged gradient shards
  with their clipping factors, in a window its holder maps (the owner reduces each step's
  gradients straight into slot ``step % depth``);
* the shard is cut into ``depth`` chunks. As soon as its gather of update ``c`` is done,
  the holder starts copying chunk ``c % depth`` of the owner's parameters (its own
  gathered copy) and state into a spare chunk slot of its base window, on a background
  thread, so the copy overlaps the return to the controller and the next forward and
  backward. Once ``c`` has committed and the copy is done (at the latest before the
  holder joins step ``c + 1``'s gradient-norm allreduce) it points the chunk's table entry
  (step and slot, one 8-byte store) at it; the old slot becomes the spare. So a holder
  killed mid-copy leaves every table entry on a complete copy, and an update that never
  committed is never pointed at;
* the shard at commit ``c`` is rebuilt chunk by chunk: the chunk's base copy (at most
  ``depth - 1`` steps old) plus the logged steps after it, replayed as the owner did them.
  The holder rebuilds it for a lost owner; the owner rebuilds it to undo an update that
  never committed, from its holder's base (which a dead holder's mapping still holds).

Why the copies and the log are never torn:

* the owner's state is at ``c`` while its holder copies it: the holder saw the owner's
  update ``c`` in its gather, and the owner applies update ``c + 1`` only after the
  gradient-norm allreduce, which the holder joins after its copy is done (and anything
  else the owner writes, an undo or a load, belongs to a step that never committed or to
  a recovery that drops the copy);
* the owner writes slot ``(c + 1) % depth`` (the oldest step's) when its reduction
  completes, which needs the holder's gradients, sent after the holder learned that ``c``
  committed. From then on the table entry that still needs that step is replaced by the
  copy of ``c`` as soon as it is done, before anything reads the table: the owner needs
  its own base only to undo update ``c + 1``, which it applies after the holder's
  allreduce, and a holder rebuilding a lost owner waits for its copy first;
* chunk boundaries sit on multiples of ``ALIGN`` elements from a bucket's start, so a
  replay sees the same vector lanes as the owner's update and gives the owner's bits.

Per step this costs one copy of ``1/depth`` of the shard (parameters and state), off the
training thread where the step leaves a core or the controller's round trip time; memory is
``depth - 1`` gradient shards beyond the one every rank has, and ``(depth + 1) / depth``
copies of the shard's parameters and state.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from distopt.collectives.window import Window, carve, open_window

if TYPE_CHECKING:
    from distopt.optim.sharded import ShardedOptimizer

ALIGN = 64  # elements; a multiple of every vector width, so lanes match the owner's update
DEPTH = 4  # default chunks and logged steps
MAX_DEPTH = 64
_SLOTS = 1024  # a table entry is step * _SLOTS + slot (slots: depth + 1)


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _copier() -> ThreadPoolExecutor:
    """This process's thread for the holders' chunk copies (one thread, kept: starting a
    thread per step costs a scheduler slice; made anew in a forked child, which has none)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="distopt-replica-copy"))
        return _pool[1]


def check_depth(depth: object) -> None:
    """Raise ValueError unless ``depth`` is a valid ``replica_log_depth``."""
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"replica_log_depth={depth!r} must be an int in [1, {MAX_DEPTH}]")


def _header(nbytes: int) -> int:
    return -(-nbytes // 64) * 64  # tensors start on a cache line


def chunk_pieces(sizes: list[int], depth: int) -> list[list[tuple[int, int, int]]]:
    """Cut the concatenated buckets ``sizes`` into ``depth`` chunks of about equal length,
    each a list of ``(bucket, lo, hi)``; every cut lies ``ALIGN``-aligned within its bucket."""
    starts = [sum(sizes[:b]) for b in range(len(sizes))]
    n = sum(sizes)
    cuts = [0]
    for j in range(1, depth):
        g = round(j * n / depth)
        b = max([i for i, s in enumerate(starts) if s <= g] or [0])
        cuts.append(max(cuts[-1], starts[b] + (g - starts[b]) // ALIGN * ALIGN))
    cuts.append(n)
    return [[(b, max(a, s) - s, min(z, s + size) - s) for b, (s, size) in enumerate(zip(starts, sizes))
             if max(a, s) < min(z, s + size)] for a, z in zip(cuts, cuts[1:])]


class _Log:
    """The owner's window: logged steps and scales, ``depth`` gradient slots, the state."""

    def __init__(self, buf: torch.Tensor, sizes: list[int], depth: int, dtype: torch.dtype, template) -> None:
        n, head = sum(sizes), _header(16 * depth)
        self.steps = buf[: 8 * depth].view(torch.int64)
        self.scales = buf[8 * depth: 16 * depth].view(torch.float64)
        self.flats = carve(buf, dtype, [n] * depth, offset=head)
        self.slots = [list(flat.split(sizes)) for flat in self.flats]  # per-bucket views of each slot
        fields = [f for f in template if f]
        parts = iter(carve(buf, dtype, sizes * len(fields), offset=head + depth * n * dtype.itemsize))
        self.state = type(template)(*[[next(parts) for _ in sizes] if f else [] for f in template])

    @staticmethod
    def nbytes(n: int, depth: int, fields: int, item: int) -> int:
        return _header(16 * depth) + (depth + fields) * n * item


class _Base:
    """The holder's window: the chunk table and ``depth + 1`` slots of parameter+state chunks."""

    def __init__(self, buf: torch.Tensor, width: int, depth: int, fields: int, dtype: torch.dtype) -> None:
        self.table = buf[: 8 * depth].view(torch.int64)
        slot_bytes = width * fields * dtype.itemsize
        self.slots = [carve(buf, dtype, [width] * fields, offset=_header(8 * depth) + s * slot_bytes)
                      for s in range(depth + 1)]

    @staticmethod
    def nbytes(width: int, depth: int, fields: int, item: int) -> int:
        return _header(8 * depth) + (depth + 1) * width * fields * item


class _Layout:
    """How one rank's shard is cut: bucket sizes, state fields, chunks and a chunk slot's width."""

    def __init__(self, opt: "ShardedOptimizer", depth: int) -> None:
        self.sizes = [t.numel() for t in opt._p_shards]
        self.dtype = opt._params.data.dtype
        self.template = opt.rule.init([torch.zeros(1)])
        self.fields = 1 + sum(1 for f in self.template if f)  # the parameters, then each state field kept
        self.chunks = chunk_pieces(self.sizes, depth)
        self.width = max([sum(hi - lo for _, lo, hi in c) for c in self.chunks] + [1])


class ReplicaLog:
    """One rank's side of the copy-and-log redundancy (see the module docstring)."""

    def __init__(self, opt: "ShardedOptimizer", lay: _Layout, log: Window, base: Window, depth: int,
                 distance: int) -> None:
        self.opt, self.depth, self.template, self.chunks = opt, depth, lay.template, lay.chunks
        item = lay.dtype.itemsize
        self.own_log = _Log(log.mine, lay.sizes, depth, lay.dtype, lay.template)
        self.left_log = _Log(log.peer, lay.sizes, depth, lay.dtype, lay.template)
        self.base = _Base(base.mine, lay.width, depth, lay.fields, lay.dtype)  # the left neighbour's
        self.own_base = _Base(base.peer, lay.width, depth, lay.fields, lay.dtype)  # this rank's, kept by its holder
        self.bytes = _Base.nbytes(lay.width, depth, lay.fields, item) + (depth - 1) * sum(lay.sizes) * item
        left = (opt.comm.rank - distance) % opt.comm.world_size
        # The left neighbour's parameters as this rank's gathered copy holds them.
        self.left_params = [opt._params.data[s:e] for s, e in opt.plan.ranges(left)]
        self._sources = [self._pieces_of(self.left_params, self.left_log.state, j) for j in range(depth)]
        for mine, live in zip(self.own_log.state, opt.state):  # the live state moves where the holder sees it
            if mine:
                torch._foreach_copy_(mine, live)
        opt.state = self.own_log.state
        self._spare = depth
        self._refreshed: int | None = None
        self._ahead: tuple[int, Future | None] | None = None  # the background copy: its update, its job
        self._take_ahead = False  # its update has committed: settle() points the table at it

    @classmethod
    def local(cls, opt: "ShardedOptimizer", depth: int) -> "ReplicaLog":
        """The rank as its own holder, in private memory: the same copies and log let it undo
        an update that never committed (:meth:`undo`) for ``1/depth`` of a shard copy per
        step, where a snapshot before each update copies all of it. No communication."""
        lay = _Layout(opt, depth)
        item, device = lay.dtype.itemsize, opt._params.data.device
        log = torch.zeros(_Log.nbytes(sum(lay.sizes), depth, lay.fields - 1, item), dtype=torch.uint8, device=device)
        base = torch.zeros(_Base.nbytes(lay.width, depth, lay.fields, item), dtype=torch.uint8, device=device)
        return cls(opt, lay, Window(log, log), Window(base, base), depth, 0)

    @classmethod
    def open(cls, opt: "ShardedOptimizer", distance: int, depth: int) -> "ReplicaLog | None":
        """Map the two windows (a collective); None on every rank if any rank cannot."""
        lay = _Layout(opt, depth)
        item = lay.dtype.itemsize
        log = open_window(opt.comm, _Log.nbytes(sum(lay.sizes), depth, lay.fields - 1, item), -distance)
        base = open_window(opt.comm, _Base.nbytes(lay.width, depth, lay.fields, item), distance) if log else None
        return cls(opt, lay, log, base, depth, distance) if base is not None else None

    # --- every step ----------------------------------------------------------------
    def bind(self, committed: int) -> None:
        """Point the optimizer's gradient shards at the slot of update ``committed + 1``."""
        s = (committed + 1) % self.depth
        self.opt._g_flat, self.opt._g_shards = self.own_log.flats[s], self.own_log.slots[s]

    def record(self, step: int, scale: float) -> None:
        """Log update ``step``'s clipping factor (its gradients are already in their slot)."""
        s = step % self.depth
        self.own_log.scales[s], self.own_log.steps[s] = scale, step

    def copy_ahead(self, step: int) -> None:
        """Start copying chunk ``step % depth`` of the left neighbour's shard, as update ``step``
        left it, into the spare slot on the background thread (call once this rank's gather
        of ``step`` is done). The table points at the copy only after :meth:`refresh` says
        ``step`` committed and :meth:`settle` found the copy done."""
        self.settle()
        j = step % self.depth
        job = _copier().submit(torch._foreach_copy_, self._pieces(self.base.slots[self._spare], j),
                               self._sources[j]) if self.chunks[j] else None
        self._ahead = (step, job)

    def refresh(self, committed: int) -> None:
        """Update ``committed`` has committed: its chunk's copy becomes the chunk's base (the
        copy made ahead once :meth:`settle` finds it done; without one, a copy made now)."""
        if self._refreshed == committed:
            return
        self._refreshed = committed
        if self._ahead is not None and self._ahead[0] == committed:
            self._take_ahead = True
            return
        self.settle()
        j = committed % self.depth
        if self.chunks[j]:
            torch._foreach_copy_(self._pieces(self.base.slots[self._spare], j), self._sources[j])
        self._point(committed)

    def settle(self) -> None:
        """Wait for the background copy; point the table at it if its update committed, else
        drop it. Before this rank joins the gradient-norm allreduce (after which the
        neighbour may change what is being copied) and before the table is read or reset."""
        if self._ahead is None:
            return
        (step, job), self._ahead = self._ahead, None
        if job is not None:
            job.result()
        if self._take_ahead:
            self._take_ahead = False
            self._point(step)

    def _point(self, step: int) -> None:
        # One 8-byte store: a holder killed around it leaves the entry on a complete copy.
        j = step % self.depth
        old = int(self.base.table[j]) % _SLOTS
        self.base.table[j] = step * _SLOTS + self._spare
        self._spare = old

    # --- set-up and recovery -------------------------------------------------------
    def reset(self, state, step: int) -> None:
        """Every chunk's base is the left neighbour's parameters (this rank's copy) and
        ``state`` at ``step`` (``state=None``: zero state); nothing is logged."""
        self.settle()
        state = state if state is not None else self.opt.rule.init(self.left_params)
        for j in range(self.depth):
            if self.chunks[j]:
                torch._foreach_copy_(self._pieces(self.base.slots[j], j),
                                     self._pieces_of(self.left_params, state, j))
            self.base.table[j] = step * _SLOTS + j
        self._spare, self._refreshed = self.depth, step
        self.own_log.steps.fill_(-1)
        self.bind(step)

    def replica(self, committed: int):
        """The left neighbour's shard at ``committed``, rebuilt from the base and its log."""
        from distopt.optim.redundancy import Shard
        self.settle()
        params = [torch.empty_like(t) for t in self.opt._p_shards]
        state = self.opt.rule.init(params)
        self._rebuild(committed, self.base, self.left_log, params, state, "replica of the left neighbour")
        return Shard(params, state, committed)

    def undo(self, committed: int) -> None:
        """Return this rank's live shard to ``committed`` from its holder's base and its own log."""
        self.settle()
        self._rebuild(committed, self.own_base, self.own_log, self.opt._p_shards, self.opt.state, "own shard")

    def _rebuild(self, committed: int, base: _Base, log: _Log, params, state, what: str) -> None:
        from distopt.optim.redundancy import RecoveryError, clipped
        rule = self.opt.rule
        for j in range(self.depth):
            entry = int(base.table[j])
            since, slot = entry // _SLOTS, entry % _SLOTS
            if since > committed:
                raise RecoveryError(f"{what}: chunk {j} was copied at update {since}, past the commit {committed}")
            if not self.chunks[j]:
                continue
            p, st = self._pieces_of(params, state, j, split=True)
            torch._foreach_copy_(p + [t for f in st for t in f], self._pieces(base.slots[slot], j))
            for step in range(since + 1, committed + 1):
                s = step % self.depth
                if int(log.steps[s]) != step:
                    raise RecoveryError(f"{what}: the gradients of update {step} are no longer logged "
                                        f"(slot {s} holds update {int(log.steps[s])})")
                grads = [log.slots[s][b][lo:hi] for b, lo, hi in self.chunks[j]]
                rule.apply(p, rule.prepare(p, clipped(grads, float(log.scales[s])), step), st, step)

    # --- views ----------------------------------------------------------------------
    def _pieces_of(self, params: list[torch.Tensor], state, j: int, split: bool = False):
        """Chunk ``j`` of per-bucket ``params`` and each kept state field."""
        cut = [[t[b][lo:hi] for b, lo, hi in self.chunks[j]] for t in [params] + [f for f in state if f]]
        if not split:
            return [t for c in cut for t in c]
        parts = iter(cut[1:])
        return cut[0], type(self.template)(*[next(parts) if f else [] for f in self.template])

    def _pieces(self, slot: list[torch.Tensor], j: int) -> list[torch.Tensor]:
        """Chunk ``j`` laid out in one base slot: each field's pieces back to back."""
        lengths = [hi - lo for _, lo, hi in self.chunks[j]]
        return [t for flat in slot for t in flat[: sum(lengths)].split(lengths)]

    def nbytes(self) -> int:
        """Memory beyond what the rank has without redundancy."""
        return self.bytes
