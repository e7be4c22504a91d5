"""Copies of a rank's own shard and a log of its gradients: the undo across hosts, on CPU.

A rank whose replica lives on another host must be able to return its own shard to the
last commit by itself (its holder may be the rank that died). A snapshot of the whole shard
before each update does it for one full copy per step; this log does it for ``1/depth`` of
one. In the rank's own memory it keeps

* the last ``depth + 1`` averaged gradient shards with their clipping factors (the
  optimizer reduces each step's gradients straight into slot ``step % (depth + 1)``);
* the shard cut into ``depth`` chunks, each kept as a copy of its parameters and state at
  some recent update, in ``depth + 1`` chunk slots, and a table naming each chunk's slot
  and update. As soon as its gather of update ``c`` is done, the rank starts copying
  chunk ``c % depth`` of its parameters and state into the spare chunk slot, on a
  background thread, so the copy overlaps the return to the controller and the next
  forward and backward. Once ``c`` has committed and the copy is done (before the rank
  joins step ``c + 1``'s gradient-norm allreduce, so before its update ``c + 1``) it
  points the chunk's table entry (update and slot, one 8-byte store) at it; the old slot
  becomes the spare. So an update that never committed is never pointed at;
* the shard at commit ``c`` is rebuilt chunk by chunk: the chunk's copy (at most
  ``depth - 1`` updates old, ``depth`` while the next copy runs) plus the logged steps
  after it, replayed as the rank did them.

Why the copies and the log are never torn:

* the shard is at ``c`` while its copy of ``c`` runs: update ``c + 1`` is applied only
  after waiting for the copy (and anything else that writes the shard, an undo or a load,
  waits for it or belongs to a step that never committed, whose copy is dropped);
* the reduction of step ``c + 1`` overwrites slot ``(c + 1) % (depth + 1)``, which holds
  update ``c - depth``: no chunk needs it, since the oldest copy, of update ``c - depth``
  until the copy of ``c`` replaces it, needs the updates after it;
* chunk boundaries sit on multiples of ``ALIGN`` elements from a bucket's start, so a
  replay sees the same vector lanes as the rank's update and gives the same bits.

Memory: ``depth`` gradient shards beyond the one every rank has, and ``(depth + 1) / depth``
copies of the shard's parameters and state.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
import torch

from distopt.collectives.window import carve
from distopt.ft.errors import RecoveryError
from distopt.optim.sharded import ShardedOptimizer

ALIGN = 64  # elements; a multiple of every vector width, so lanes match the owner's update
DEPTH = 4  # default chunks (and logged steps, one more)
MAX_DEPTH = 64
_SLOTS = 1024  # a table entry is step * _SLOTS + slot (slots: depth + 1)
_TORN = -1  # the table entry of a chunk being reset


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def background() -> ThreadPoolExecutor:
    """This process's thread for the redundancy's work beside the step (chunk copies,
    replays; one thread, kept: starting a thread per step costs a scheduler slice; made
    anew in a forked child, which has none)."""
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


def chunk_pieces(sizes: list[int], depth: int,
                 allowed: list[list[int] | None] | None = None) -> list[list[tuple[int, int, int]]]:
    """Cut the concatenated buckets ``sizes`` into ``depth`` chunks of about equal length,
    each a list of ``(bucket, lo, hi)``; every cut lies ``ALIGN``-aligned within its bucket,
    or, where ``allowed[b]`` lists places (a whole-matrix bucket's row bounds), on one of them."""
    starts = [sum(sizes[:b]) for b in range(len(sizes))]
    n = sum(sizes)
    cuts = [0]
    for j in range(1, depth):
        g = round(j * n / depth)
        b = max([i for i, s in enumerate(starts) if s <= g] or [0])
        places = allowed[b] if allowed is not None and b < len(allowed) else None
        rel = (g - starts[b]) // ALIGN * ALIGN if places is None else max(c for c in places if c <= g - starts[b])
        cuts.append(max(cuts[-1], starts[b] + rel))
    cuts.append(n)
    return [[(b, max(a, s) - s, min(z, s + size) - s) for b, (s, size) in enumerate(zip(starts, sizes))
             if max(a, s) < min(z, s + size)] for a, z in zip(cuts, cuts[1:])]


class _Area:
    """The log's memory: the chunk table, the logged steps and clipping factors, ``depth + 1``
    gradient slots and ``depth + 1`` chunk slots (parameters, then each state field)."""

    def __init__(self, buf: torch.Tensor, lay: "_Chunking", depth: int) -> None:
        n, item, slots = sum(lay.sizes), lay.dtype.itemsize, depth + 1
        self.table = buf[: 8 * depth].view(torch.int64)
        self.steps = buf[8 * depth: 8 * (depth + slots)].view(torch.int64)
        self.scales = buf[8 * (depth + slots): 8 * (depth + 2 * slots)].view(torch.float64)
        head = _header(8 * (depth + 2 * slots))
        self.flats = carve(buf, lay.dtype, [n] * slots, offset=head)
        self.grads = [list(flat.split(lay.sizes)) for flat in self.flats]  # per-bucket views of each slot
        chunk_bytes = lay.width * lay.fields * item
        self.chunks = [carve(buf, lay.dtype, [lay.width] * lay.fields, offset=head + slots * n * item + s * chunk_bytes)
                       for s in range(slots)]

    @staticmethod
    def nbytes(lay: "_Chunking", depth: int) -> int:
        item = lay.dtype.itemsize
        return _header(8 * (3 * depth + 2)) + (depth + 1) * (sum(lay.sizes) + lay.width * lay.fields) * item


class _Chunking:
    """How one rank's shard is cut: bucket sizes, state fields, chunks and a chunk slot's width."""

    def __init__(self, opt: ShardedOptimizer, depth: int) -> None:
        self.sizes = [t.numel() for t in opt.shard_params]
        self.dtype = opt.params_flat.data.dtype
        self.names = list(opt.shard_state)
        self.fields = 1 + len(self.names)  # the parameters, then each state field kept
        # Bucket b's field k (0: the parameters) is copied where its rule keeps it.
        self.kept = [[True] + [f in opt.rules.bucket_fields[b] for f in self.names] for b in range(len(self.sizes))]
        self.chunks = chunk_pieces(self.sizes, depth, [opt.rules.cuts(b) for b in range(len(self.sizes))])
        self.width = max([sum(hi - lo for _, lo, hi in c) for c in self.chunks] + [1])


class ReplicaLog:
    """One rank's copies of its shard and log of its gradients (see the module docstring)."""

    def __init__(self, opt: ShardedOptimizer, lay: _Chunking, depth: int) -> None:
        self.opt, self.depth, self.names, self.kept, self.chunks = opt, depth, lay.names, lay.kept, lay.chunks
        self.own = _Area(torch.zeros(_Area.nbytes(lay, depth), dtype=torch.uint8, device=opt.device), lay, depth)
        self.bytes = _Area.nbytes(lay, depth) - sum(lay.sizes) * lay.dtype.itemsize  # (a gradient shard it had)
        self._sources = [self._pieces_of(opt.shard_params, opt.shard_state, j)[0] for j in range(depth)]
        self._spare = depth
        self._refreshed: int | None = None
        self._ahead: tuple[int, Future | None] | None = None  # the background copy: its update, its job
        self._take_ahead = False  # its update has committed: settle() points the table at it

    @classmethod
    def local(cls, opt: ShardedOptimizer, depth: int) -> "ReplicaLog":
        """The log of ``opt``'s shard, in this rank's memory; no communication."""
        return cls(opt, _Chunking(opt, depth), depth)

    # --- every step ----------------------------------------------------------------
    def bind(self, committed: int) -> None:
        """Point the optimizer's gradient shards at the slot of update ``committed + 1``."""
        self.opt.use_grad_shards(self.own.flats[(committed + 1) % (self.depth + 1)])

    def record(self, step: int, scale: float) -> None:
        """Log update ``step``'s clipping factor (its gradients are already in their slot)."""
        s = step % (self.depth + 1)
        self.own.scales[s], self.own.steps[s] = scale, step

    def copy_ahead(self, step: int) -> None:
        """Start copying chunk ``step % depth`` of this rank's shard, as update ``step`` left
        it, into the spare chunk slot on the background thread (once the gather of ``step``
        is done). The table points at the copy only after :meth:`refresh` says ``step``
        committed and :meth:`settle` found the copy done."""
        self.settle()
        j = step % self.depth
        job = background().submit(torch._foreach_copy_, self._pieces(self.own.chunks[self._spare], j),
                               self._sources[j]) if self.chunks[j] else None
        self._ahead = (step, job)

    def refresh(self, committed: int) -> None:
        """Update ``committed`` has committed: its chunk's copy becomes the chunk's copy of
        record (the one made ahead once :meth:`settle` finds it done; without one, one made now)."""
        if self._refreshed == committed:
            return
        self._refreshed = committed
        copied_ahead = self._ahead is not None and self._ahead[0] == committed
        if not copied_ahead:
            self.copy_ahead(committed)
        self._take_ahead = True
        if not copied_ahead:  # (after a recovery or load): the copy is waited for now
            self.settle()

    def settle(self) -> None:
        """Wait for the background copy; point the table at it if its update committed, else
        drop it. Before anything changes this rank's shard (its next update: the optimizer
        settles before the gradient-norm allreduce) and before the table is read or reset."""
        if self._ahead is None:
            return
        (step, job), self._ahead = self._ahead, None
        if job is not None:
            job.result()
        if self._take_ahead:
            self._take_ahead = False
            self._point(step)

    def _point(self, step: int) -> None:
        # One 8-byte store: a rank killed around it leaves the entry on a complete copy.
        j = step % self.depth
        old = int(self.own.table[j]) % _SLOTS
        self.own.table[j] = step * _SLOTS + self._spare
        self._spare = old

    # --- set-up and recovery -------------------------------------------------------
    def reset(self, step: int) -> None:
        """Every chunk's copy is this rank's shard (parameters and state) at ``step``; nothing
        is logged."""
        self.settle()
        self.own.table.fill_(_TORN)  # a rank killed below leaves no copy that looks complete
        for j in range(self.depth):
            if self.chunks[j]:
                torch._foreach_copy_(self._pieces(self.own.chunks[j], j), self._sources[j])
        self.own.table.copy_(torch.arange(self.depth, dtype=torch.int64) + step * _SLOTS)
        self._spare, self._refreshed = self.depth, step
        self.own.steps.fill_(-1)
        self.bind(step)

    def undo(self, committed: int) -> None:
        """Return this rank's live shard to ``committed`` from its own copies and log."""
        self.settle()
        params, state, area, rank, what = self.opt.shard_params, self.opt.shard_state, self.own, self.opt.shard_rank, \
            "own shard"
        slots = self.depth + 1
        for j in range(self.depth):
            entry = int(area.table[j])
            if entry == _TORN:
                raise RecoveryError(f"{what}: chunk {j} has no complete copy (the rank was resetting it)")
            since, slot = entry // _SLOTS, entry % _SLOTS
            if since > committed:
                raise RecoveryError(f"{what}: chunk {j} was copied at update {since}, past the commit {committed}")
            if not self.chunks[j]:
                continue
            flat, p, st = self._pieces_of(params, state, j)
            torch._foreach_copy_(flat, self._pieces(area.chunks[slot], j))
            for step in range(since + 1, committed + 1):
                s = step % slots
                if int(area.steps[s]) != step:
                    raise RecoveryError(f"{what}: the gradients of update {step} are no longer logged "
                                        f"(slot {s} holds update {int(area.steps[s])})")
                grads = [area.grads[s][b][lo:hi] for b, lo, hi in self.chunks[j]]
                self.opt.rules.apply(step, [b for b, _, _ in self.chunks[j]], p, grads, st, float(area.scales[s]),
                                     rank, [lo for _, lo, _ in self.chunks[j]])

    # --- views ----------------------------------------------------------------------
    def _pieces_of(self, params: list[torch.Tensor], state: dict, j: int):
        """Chunk ``j`` of per-bucket ``params`` and each state field, as the flat list of the
        pieces kept (each field's back to back, as a chunk slot holds them), the parameters'
        pieces, and a state dict of pieces (empty where the bucket's rule keeps no such field)."""
        fields = [params] + [state[f] for f in self.names]
        cut = [[t[b][lo:hi] if self.kept[b][k] else t[b][:0] for b, lo, hi in self.chunks[j]]
               for k, t in enumerate(fields)]
        flat = [t for k, c in enumerate(cut) for (b, _, _), t in zip(self.chunks[j], c) if self.kept[b][k]]
        return flat, cut[0], dict(zip(self.names, cut[1:]))

    def _pieces(self, slot: list[torch.Tensor], j: int) -> list[torch.Tensor]:
        """Chunk ``j`` laid out in one chunk slot: each field's kept pieces back to back."""
        out = []
        for k, flat in enumerate(slot):
            kept = [(b, hi - lo) for b, lo, hi in self.chunks[j] if self.kept[b][k]]
            out += flat[: sum(n for _, n in kept)].split([n for _, n in kept]) if kept else []
        return out

    def nbytes(self) -> int:
        """Memory beyond what the rank has without redundancy."""
        return self.bytes
