"""The torch.distributed backend: gloo on CPU tensors, NCCL on CUDA tensors.

A :class:`TorchCommunicator` made by its constructor owns its own process group built
straight from a store (:mod:`distopt.collectives.rendezvous`), never torch's global default
group, so a broken group can be closed and a new one formed in the same process (the
recovery path), and several groups can live in one process (the in-process test bed).
:meth:`TorchCommunicator.from_process_group` instead runs the same collectives on a group
the caller already formed (torchrun's default group), which it never shuts down. How a call
is started, waited for and failed is :mod:`distopt.collectives.torch_group`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (
    AllgatherOptions, AllreduceOptions, AllToAllOptions, BarrierOptions, BroadcastOptions, ReduceOp,
    ReduceScatterOptions,
)

from distopt.collectives import compression
from distopt.collectives.pending import completed, then
from distopt.collectives.base import CollectiveError, check_op, check_wire_dtype, chunk_numel, chunk_range
from distopt.collectives.rendezvous import connect_store, existing_group, make_group, validate
from distopt.collectives.torch_group import TorchGroup, check_contiguous, check_flat, deliver, first_line, padded


class TorchCommunicator(TorchGroup):
    """One rank of a torch.distributed group (see :class:`distopt.collectives.Communicator`).

    Args:
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of ranks; 1 runs every method locally with no group at all.
        host, port: rank 0's store address; rank 0 listens there, the others connect.
        backend: ``"nccl"`` (CUDA tensors, one rank per GPU) or ``"gloo"`` (CPU tensors; CUDA
            tensors too, staged through host memory, for several ranks sharing one GPU).
        timeout_s: seconds any rendezvous or collective may take before it raises.
        store: an existing ``torch.distributed.Store`` to rendezvous on instead of host/port.
        group_name: key prefix in the store; a re-formed group takes a new name.
        local_host: address this rank's gloo transport binds to (defaults to loopback
            when ``host`` is loopback, else the machine's hostname).
        always_group: form a real group even at ``world_size == 1`` (which otherwise runs
            every method locally): measures a backend's own floor, and runs the NCCL code
            path on a machine with one GPU.

    Raises:
        ValueError: bad rank, world size, backend or timeout.
        CollectiveError: the group could not be formed within ``timeout_s``.
    """

    def __init__(
        self, rank: int, world_size: int, host: str = "127.0.0.1", port: int = 29500,
        backend: str = "gloo", timeout_s: float = 60.0, *, store: dist.Store | None = None,
        group_name: str = "distopt", local_host: str | None = None, always_group: bool = False,
    ) -> None:
        validate(rank, world_size, backend, timeout_s)
        self._setup(rank, world_size, backend, timeout_s, local=world_size == 1 and not always_group)
        if self._local:  # nothing to exchange: no group
            return
        try:
            self._store = store if store is not None else connect_store(rank, world_size, host, port, self._timeout)
            self._pg = make_group(backend, dist.PrefixStore(group_name + "/", self._store), rank, world_size,
                                  self._timeout, host, local_host)
        except Exception as e:  # store and group constructors raise several RuntimeError kinds
            raise CollectiveError(
                f"rank {rank} could not form a {backend} group of {world_size} at {host}:{port} "
                f"within {self.timeout_s:g}s: {first_line(e)}. Check that every rank started, "
                f"that they share host/port, and that the port is reachable") from e

    @classmethod
    def from_process_group(cls, group: dist.ProcessGroup | None = None) -> TorchCommunicator:
        """Run this class's collectives on a process group torch.distributed already formed.

        Under torchrun, ``torch.distributed.init_process_group`` has formed the default
        group; wrapping it needs no second port or store. Every method works as on a group
        this class forms, and every rank of ``group`` must call the same collectives in the
        same order. The caller's own collectives on ``group`` may come between them, in the
        same order on every rank too.

        Collectives time out after the group's own timeout, the one given to
        ``init_process_group`` (or ``new_group``): pass ``timeout=timedelta(seconds=...)``
        there, so a dead or stalled peer raises :class:`CollectiveError` within that time
        (torch's default waits 10 minutes on NCCL, 30 on gloo). On NCCL also set
        ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` before the group forms; torch's default kills
        the process when a collective times out instead of raising.

        Args:
            group: an initialised ``gloo`` or ``nccl`` group this process belongs to (with
                ``"cpu:gloo,cuda:nccl"``, CUDA tensors take NCCL, CPU tensors gloo); None
                for torch's default group.

        Returns:
            A communicator with the group's ``rank`` and ``world_size``. Its :meth:`close`
            leaves ``group`` usable (the group belongs to the caller); its :attr:`store` is
            the default group's store, or None where torch does not expose one.

        Raises:
            RuntimeError: ``group`` is None and the default group is not initialised.
            ValueError: this process is not a member of ``group``, or its backend is
                neither gloo nor NCCL.
        """
        group, backend, timeout_s, store = existing_group(group)
        comm = cls.__new__(cls)
        comm._setup(group.rank(), group.size(), backend, timeout_s, local=group.size() == 1)
        comm._pg, comm._owns_group, comm._store = group, False, store
        return comm

    @property
    def store(self) -> dist.Store | None:
        """The rendezvous store; another group may form on it.

        Rank 0 serves it for a group this class formed; a wrapped group
        (:meth:`from_process_group`) gives torch's default store. None after :meth:`close`,
        for a constructed communicator of world size 1, and where torch exposes no default store.
        """
        return self._store

    # --- the collectives ------------------------------------------------------------
    def allreduce(self, t: torch.Tensor, op: str = "sum", wire_dtype: torch.dtype | None = None,
                  async_op: bool = False):
        """Reduce ``t`` over all ranks, in place; returns ``t`` (a :class:`Pending` with ``async_op``).

        With ``wire_dtype`` (bf16/fp16) values cross the wire narrowed and are summed in
        ``t``'s dtype (see :mod:`distopt.collectives.compression`; never asynchronous).
        """
        check_op(op, t.dtype)
        check_wire_dtype(wire_dtype, t.dtype)
        check_contiguous(t, "allreduce")
        if self._local:
            return completed(t, async_op)
        if self._staged(t):
            return self._via_host(t, lambda h: self.allreduce(h, op, wire_dtype, async_op=True), t, async_op)
        if wire_dtype is not None and wire_dtype != t.dtype:
            return completed(compression.allreduce(self, t, op, wire_dtype), async_op)
        self._prescale(t, op)
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.SUM
        works = self._start("allreduce", lambda _: self._pg.allreduce([t], opts))

        def finish() -> torch.Tensor:
            self._postscale(t, op)
            return t
        return self._finish("allreduce", works, finish, async_op)

    def reduce_scatter(
        self, flat: torch.Tensor, op: str = "sum", wire_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None, async_op: bool = False,
    ):
        """Reduce the 1-D ``flat`` over all ranks; return this rank's chunk of the result.

        Chunk ``r`` is ``flat[r*c:(r+1)*c]`` with ``c = ceil(numel / world_size)``, clipped
        to ``numel`` (trailing chunks may be short or empty). ``flat`` is left unspecified.
        ``out``, when given, receives the chunk and is returned; it may be ``flat``'s own chunk
        (in place, as NCCL allows), so no memory beyond ``flat`` holds the result.
        """
        check_op(op, flat.dtype)
        check_wire_dtype(wire_dtype, flat.dtype)
        check_flat(flat, "reduce_scatter")
        n, w = flat.numel(), self.world_size
        start, end = chunk_range(n, w, self.rank)
        if self._local:
            return completed(deliver(flat, out), async_op)
        if self._staged(flat):
            return self._via_host(flat, lambda h: self.reduce_scatter(h, op, wire_dtype, async_op=True), out,
                                  async_op)
        if wire_dtype is not None and wire_dtype != flat.dtype:
            narrow = compression.reduce_scatter(self, flat, op, wire_dtype, async_op=True)
            return then(lambda: deliver(narrow.wait(), out), async_op)
        c = chunk_numel(n, w)
        send = flat if n == c * w else padded(flat, c * w)
        buf = out if out is not None and out.numel() == c == end - start else flat.new_empty(c)
        self._prescale(send, op)
        if self.backend == "gloo":
            begin, total = self._pairwise.reduce_scatter(send, buf)
            works = self._start("reduce_scatter", lambda tag: begin(self._pg, tag))
        else:
            opts = ReduceScatterOptions()
            opts.reduceOp = ReduceOp.SUM
            works, total = self._start("reduce_scatter", lambda _: self._pg._reduce_scatter_base(buf, send, opts)), None

        def finish() -> torch.Tensor:
            if total is not None:
                total()
            self._postscale(buf, op)
            return deliver(buf[: end - start], out)
        return self._finish("reduce_scatter", works, finish, async_op)

    def allgather(self, shard: torch.Tensor, numel: int | None = None, out: torch.Tensor | None = None,
                  async_op: bool = False):
        """Concatenate every rank's 1-D shard in rank order.

        Without ``numel`` all shards must have the same size. With ``numel`` the shards are
        the chunks :meth:`reduce_scatter` hands out for a flat tensor of ``numel`` elements
        and the result has ``numel`` elements. ``out`` may hold this rank's shard as a view
        (an in-place gather, no copy).
        """
        check_flat(shard, "allgather")
        w = self.world_size
        if numel is None:
            c, n = shard.numel(), shard.numel() * w
        else:
            c, n = chunk_numel(numel, w), numel
            start, end = chunk_range(numel, w, self.rank)
            if shard.numel() != end - start:
                raise ValueError(f"allgather: rank {self.rank} holds {shard.numel()} elements but its chunk "
                                 f"of numel={numel} has {end - start}: pass the shard reduce_scatter returned")
        if self._local:
            return completed(deliver(shard, out), async_op)
        if self._staged(shard):
            return self._via_host(shard, lambda h: self.allgather(h, numel, async_op=True), out, async_op)
        send = shard if shard.numel() == c else padded(shard, c)
        buf = out if out is not None and out.numel() == c * w else shard.new_empty(c * w)
        if self.backend == "gloo":
            begin = self._pairwise.allgather(send, buf)
            works = self._start("allgather", lambda tag: begin(self._pg, tag))
        else:
            works = self._start("allgather", lambda _: self._pg._allgather_base(buf, send, AllgatherOptions()))
        return self._finish("allgather", works, lambda: deliver(buf[:n], out), async_op)

    def all_to_all(self, t: torch.Tensor, async_op: bool = False):
        """Exchange equal chunks: chunk ``j`` of the result is chunk ``rank`` of rank ``j``'s ``t``."""
        check_flat(t, "all_to_all")
        if t.numel() % self.world_size:
            raise ValueError(f"all_to_all: numel={t.numel()} is not divisible by world_size={self.world_size}: pad it")
        if self._local:
            return completed(t.clone(), async_op)
        if self._staged(t):
            return self._via_host(t, lambda h: self.all_to_all(h, async_op=True), None, async_op)
        out = torch.empty_like(t)
        works = self._start("all_to_all", lambda _: self._pg.alltoall_base(out, t, [], [], AllToAllOptions()))
        return self._finish("all_to_all", works, lambda: out, async_op)

    def shift(self, t: torch.Tensor, out: torch.Tensor | None = None, async_op: bool = False, distance: int = 1):
        """Send ``t`` to rank ``rank + distance`` and return what rank ``rank - distance`` sent
        (mod world size).

        Every rank passes a 1-D tensor of the same size and dtype, and the same ``distance``.
        """
        check_flat(t, "shift")
        if not isinstance(distance, int) or distance < 1:
            raise ValueError(f"shift: distance={distance!r} must be an int >= 1")
        if distance % self.world_size == 0:  # its own neighbour: no backend sends to itself
            return completed(t.clone() if out is None else out.copy_(t), async_op)
        if self._staged(t):
            return self._via_host(t, lambda h: self.shift(h, async_op=True, distance=distance), out, async_op)
        out = out if out is not None else torch.empty_like(t)
        right, left = (self.rank + distance) % self.world_size, (self.rank - distance) % self.world_size
        works = self._start("shift", lambda tag: [self._pg.send([t], right, tag), self._pg.recv([out], left, tag)])
        return self._finish("shift", works, lambda: out, async_op)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` on every rank with rank ``src``'s values; returns ``t``."""
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast: src={src} is not a rank of a group of {self.world_size}")
        check_contiguous(t, "broadcast")
        if self._local:
            return t
        if self._staged(t):
            return t.copy_(self.broadcast(t.cpu(), src))
        opts = BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self._run("broadcast", lambda _: self._pg.broadcast([t], opts))
        return t

    def barrier(self) -> None:
        """Block until every rank has called ``barrier``."""
        if not self._local:
            self._run("barrier", lambda _: self._pg.barrier(BarrierOptions()))

    def close(self) -> None:
        """Shut the group down; later calls raise :class:`CollectiveError`.

        A group from :meth:`from_process_group` is only let go of, never shut down.
        """
        pg, self._pg, self._store = self._pg, None, None
        self._broken = self._broken or "closed"
        if pg is not None and self._owns_group:
            try:
                pg.shutdown()
            except Exception:  # a group that already failed may refuse a clean shutdown
                pass

    def __repr__(self) -> str:
        return f"TorchCommunicator(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"
