"""ShardedOptimizer: ZeRO stages 0, 1 and 2 over any :class:`Communicator`.

The given parameter tensors are re-pointed at views of one flat buffer cut into buckets
(their identity is kept, so a model holding them sees every update). Per step:

    stage 0  allreduce(mean) each gradient bucket; every rank updates everything
    stage 1  reduce_scatter(mean) each bucket into this rank's gradient shard; update the
             shard with the shard's state; allgather the new parameter shards
    stage 2  as stage 1, but the full-size gradient buffer is never kept: gradients are
             packed one bucket at a time into a bucket-sized staging buffer

World size 1 runs the same code; the communicator skips the wire.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Mapping, NamedTuple, Sequence, Union

import torch

from distopt.collectives.base import Communicator, check_wire_dtype
from distopt.collectives.buckets import DEFAULT_BUCKET_BYTES, FlatBuffer
from distopt.optim import state_io
from distopt.optim.plan import ShardPlan, plan
from distopt.optim.overlap import Overlap
from distopt.optim.redundancy import RecoveryError, Redundancy, clipped
from distopt.optim.replica_log import DEPTH as REPLICA_LOG_DEPTH, check_depth
from distopt.optim.rules import Rule

log = logging.getLogger("distopt")
Params = Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


class StepInfo(NamedTuple):
    """What one :meth:`ShardedOptimizer.step` did, identical on every rank."""

    step: int  # updates applied so far
    grad_norm: float  # L2 norm of the averaged gradient, before clipping
    skipped: bool  # a non-finite gradient somewhere: no rank updated
    comm_s: float  # seconds in gradient reduction and parameter gather
    update_s: float  # seconds in the update rule and the redundancy (replay or copy of the neighbour's shard)


class ShardedOptimizer:
    """Data-parallel optimizer with sharded state (see the module docstring for the stages).

    Args:
        params: a list of tensors or a ``name -> tensor`` dict; one floating dtype, one device.
        rule: ``distopt.optim.sgd(...)`` or ``distopt.optim.adam(...)``.
        comm: this rank's communicator; every rank constructs its optimizer in the same order.
        zero_stage: 0, 1 or 2.
        bucket_bytes: cap on one collective's buffer.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        wire_dtype: ``torch.bfloat16``/``torch.float16`` to narrow gradients on the wire.
        sync_params: broadcast rank 0's parameters at construction, so all ranks start equal.
        last_bucket_bytes: cap on the bucket of the last parameters, reduced first while
            backward is still running (1 MiB, as DDP's first bucket); None: ``bucket_bytes``.
        replicate: keep the in-memory redundancy that lets a lost rank be rebuilt and a
            failed step be undone (:mod:`distopt.optim.redundancy`).
        replica_distance: rank ``r + replica_distance`` holds rank ``r``'s replica; pick it
            with :func:`distopt.optim.redundancy.replica_distance` so a replica sits on
            another node than its shard.
        shared_memory: ranks that share a host keep the redundancy in shared memory
            (:mod:`distopt.collectives.window`) instead of sending it; False sends it always.
            The same on every rank.
        replica_log_depth: the steps over which each rank copies its shard, one less than
            the steps of gradients it logs (:mod:`distopt.optim.replica_log`; on one host
            where its holder reads them, across hosts on CPU in its own memory, to undo its
            own update): each step costs a copy of ``1/depth`` of the shard's parameters and
            state, and memory holds ``depth`` more gradient shards. The same on every rank.

    Raises:
        TypeError, ValueError: bad arguments, before any communication.
    """

    def __init__(self, params: Params, rule: Rule, comm: Communicator, zero_stage: int = 1,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, max_grad_norm: float | None = None,
                 wire_dtype: torch.dtype | None = None, sync_params: bool = True, replicate: bool = False,
                 last_bucket_bytes: int | None = 2**20, replica_distance: int = 1,
                 shared_memory: bool = True, replica_log_depth: int = REPLICA_LOG_DEPTH) -> None:
        self.names, self._tensors = _named_tensors(params)
        _check_args(self._tensors, rule, comm, zero_stage, bucket_bytes, max_grad_norm, wire_dtype)
        if not isinstance(replica_distance, int) or isinstance(replica_distance, bool) or \
                not 1 <= replica_distance <= max(1, comm.world_size - 1):
            raise ValueError(f"replica_distance={replica_distance!r} must be an int in [1, world_size - 1] "
                             f"(world_size={comm.world_size}): use distopt.optim.redundancy.replica_distance(nodes)")
        check_depth(replica_log_depth)
        self.rule, self.comm, self.zero_stage = rule, comm, zero_stage
        self.max_grad_norm, self.wire_dtype = max_grad_norm, wire_dtype
        first = self._tensors[0]
        self.plan: ShardPlan = build_plan(self.names, self._tensors, comm.world_size, zero_stage, bucket_bytes,
                                          last_bucket_bytes)
        log.debug("rank %d: %s", comm.rank, self.plan.describe())
        self._params = self._adopt_params(first.dtype, first.device)
        if sync_params:
            comm.broadcast(self._params.data, src=0)
        ranges = self.plan.ranges(comm.rank if zero_stage >= 1 else 0)
        self._p_shards = [self._params.data[s:e] for s, e in ranges]
        self._grads = self._grad_buffer() if zero_stage <= 1 else None
        self._g_shards = self._grad_shards(ranges)
        self._staging = self._params.data.new_zeros(max(e - s for s, e in self.plan.layout.buckets)) \
            if zero_stage == 2 else None
        self.state = rule.init(self._p_shards)
        self.step_count = 0
        # Called as on_phase(phase, step) at "grad_collective", "shard_update", "param_gather".
        self.on_phase: Callable[[str, int], None] | None = None
        # Called before this rank's parameter shard or state changes in place (update,
        # rollback, load): whoever still reads that memory (a checkpoint write) must let go.
        self.before_write: Callable[[], None] | None = None
        self.redundancy = Redundancy(self, replica_distance, shared_memory, replica_log_depth) if replicate else None
        self.overlap: Overlap | None = None

    # --- set-up ---------------------------------------------------------------------
    def _adopt_params(self, dtype: torch.dtype, device: torch.device) -> FlatBuffer:
        buf = FlatBuffer([t.shape for t in self._tensors], self.plan.layout, dtype, device)
        buf.copy_in([t.detach() for t in self._tensors])
        for t, view in zip(self._tensors, buf.views):
            t.data = view  # same tensor object, storage now in the flat buffer
        return buf

    def _grad_buffer(self) -> FlatBuffer:
        buf = FlatBuffer([t.shape for t in self._tensors], self.plan.layout, self._params.data.dtype,
                         self._params.data.device)
        for t, view in zip(self._tensors, buf.views):
            if t.grad is not None:
                view.copy_(t.grad)
            t.grad = view  # backward accumulates straight into the bucket
        return buf

    def _grad_shards(self, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
        if self.zero_stage == 0:
            return [self._grads.data[s:e] for s, e in ranges]
        self._g_flat = self._params.data.new_zeros(sum(e - s for s, e in ranges))
        return list(self._g_flat.split([e - s for s, e in ranges]))

    # --- the step -------------------------------------------------------------------
    def step(self, grads: Params | None = None) -> StepInfo:
        """Average gradients over ranks and apply one update; a collective.

        Every rank calls it once per step with gradients for the same parameters. Without
        ``grads`` each parameter's ``.grad`` is used. Afterwards every rank holds identical
        parameters. At stage >= 1 ``.grad`` holds unspecified values: call :meth:`zero_grad`
        before the next backward.

        Returns:
            StepInfo; ``skipped`` is True (on every rank) when any gradient was not finite.

        Raises:
            ValueError: ``grads`` does not match the parameters.
            CollectiveError: a peer failed; parameters and state are then unspecified.
        """
        given = None if grads is None else _match_grads(grads, self.names, self._tensors)
        replay_s = 0.0
        if self.redundancy is not None:
            self.redundancy.commit(self.step_count)  # being called again means the last step committed
        step = self.step_count + 1
        t0 = time.perf_counter()
        self._phase("grad_collective", step)
        if self.overlap is not None and self.overlap.capturing:
            self.overlap.finish()
        else:
            self._reduce(given)
        if self.redundancy is not None:
            t_settle = time.perf_counter()
            self.redundancy.settle()  # its copies read the shard that this step's update changes
            t0 += time.perf_counter() - t_settle  # (update time, in replay_s, not communication)
            replay_s, self.redundancy.replay_s = self.redundancy.replay_s, 0.0  # (perhaps replayed in begin)
        norm = self._global_norm()
        t1 = time.perf_counter()
        if not math.isfinite(norm):
            log.warning("rank %d: non-finite gradient (norm %s): step %d skipped on every rank",
                        self.comm.rank, norm, self.step_count + 1)
            return StepInfo(self.step_count, norm, True, t1 - t0, replay_s)
        scale = self.max_grad_norm / (norm + 1e-6) if self.max_grad_norm is not None and norm > self.max_grad_norm \
            else 1.0
        self._update(step, scale)
        t2 = time.perf_counter()
        self._phase("param_gather", step)
        if self.zero_stage >= 1:
            gathers = [self.comm.allgather(shard, out=self._params.bucket(b), async_op=True)
                       for b, shard in enumerate(self._p_shards)]
            for g in gathers:
                g.wait()
        if self.redundancy is not None:
            self.redundancy.shipped()  # the step is not done before the neighbour has our gradients
        self.step_count += 1
        if self.redundancy is not None:
            self.redundancy.gathered(self.step_count)
        return StepInfo(self.step_count, norm, False, (t1 - t0) + (time.perf_counter() - t2), replay_s + t2 - t1)

    def overlap_backward(self) -> None:
        """From now on reduce gradients during backward (hooks on the parameters).

        Before each micro-batch's backward call :meth:`begin_micro_batch`; after the last
        one, :meth:`step` with no arguments. A step without ``begin_micro_batch`` uses
        ``.grad`` or the ``grads`` given, as usual.
        """
        if self.overlap is None:
            self.overlap = Overlap(self)

    def begin_micro_batch(self, first: bool = True, last: bool = True, scale: float = 1.0) -> None:
        """Capture the coming backward's gradients, times ``scale``; reduce them after the ``last``.

        Raises:
            RuntimeError: :meth:`overlap_backward` was not called.
        """
        if self.overlap is None:
            raise RuntimeError("begin_micro_batch needs overlap_backward() first")
        self.overlap.begin(first, last, scale)

    def _update(self, step: int, scale: float) -> None:
        grads = clipped(self._g_shards, scale)
        if self.redundancy is None:
            self._phase("shard_update", step)
            self._will_write()
            self.rule.update(self._p_shards, grads, self.state, step)
            return
        prepared = self.rule.prepare(self._p_shards, grads, step)
        self.redundancy.before_update(step, scale)  # the shift to the holder stays in flight
        self._phase("shard_update", step)
        self._will_write()
        self.rule.apply(self._p_shards, prepared, self.state, step)
        self.redundancy.after_update(step)

    def _phase(self, phase: str, step: int) -> None:
        if self.on_phase is not None:
            self.on_phase(phase, step)

    def _will_write(self) -> None:
        if self.before_write is not None:
            self.before_write()

    def rollback(self, committed: int) -> None:
        """Undo a step that did not commit: this rank's shard returns to update ``committed``.

        Local, no communication; the other ranks' parameter shards are restored by the
        recovery's gather. Needs ``replicate=True``.

        Raises:
            RecoveryError: this rank cannot return to ``committed``.
        """
        if self.redundancy is None:
            raise RecoveryError("rollback needs ShardedOptimizer(..., replicate=True)")
        self._will_write()
        self.redundancy.rollback(committed)

    def _reduce(self, given: list[torch.Tensor] | None) -> None:
        if self._grads is not None and given is not None:
            self._grads.copy_in(given)
        elif self._grads is not None:
            self._adopt_loose_grads()
        for b in range(len(self.plan.layout.buckets)):
            if self.zero_stage == 0:
                self.comm.allreduce(self._grads.bucket(b), "mean", self.wire_dtype)
                continue
            flat = self._grads.bucket(b) if self._grads is not None else self._stage(b, given)
            self.comm.reduce_scatter(flat, "mean", self.wire_dtype, out=self._g_shards[b])

    def _adopt_loose_grads(self) -> None:
        # A user who set .grad to None or a new tensor gets it copied back into the bucket.
        for t, view in zip(self._tensors, self._grads.views):
            if t.grad is None:
                view.zero_()
            elif t.grad.data_ptr() != view.data_ptr():
                view.copy_(t.grad)
            t.grad = view

    def _stage(self, b: int, given: list[torch.Tensor] | None) -> torch.Tensor:
        lay = self.plan.layout
        start, end = lay.buckets[b]
        flat = self._staging[: end - start]
        flat.zero_()
        for i in lay.members(b):
            g = given[i] if given is not None else self._tensors[i].grad
            if g is not None:
                flat[lay.offsets[i] - start: lay.offsets[i] - start + lay.numels[i]].copy_(g.reshape(-1))
        return flat

    def _global_norm(self) -> float:
        # Per-bucket norms in the gradients' dtype (one fused pass, as clip_grad_norm_ does),
        # combined in double precision.
        # Summed on the device: one host synchronisation per step, not one per bucket.
        if self._g_shards:
            norms = torch.stack(torch._foreach_norm(self._g_shards, 2.0)).double()
            total = norms.square().sum().reshape(1)
        else:
            total = torch.zeros(1, dtype=torch.float64, device=self._params.data.device)
        if self.zero_stage >= 1:
            # Every rank must see the same number, so the skip/clip decision is unanimous.
            self.comm.allreduce(total, "sum")
        sumsq = float(total[0])
        return math.sqrt(sumsq) if sumsq >= 0 else float("nan")

    def zero_grad(self) -> None:
        """Reset gradients: zeros in the gradient buckets (stage 0/1), ``None`` at stage 2."""
        if self._grads is None:
            for t in self._tensors:
                t.grad = None
            return
        self._grads.data.zero_()
        for t, view in zip(self._tensors, self._grads.views):
            t.grad = view

    # --- state ----------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (moments, momentum buffers)."""
        return sum(t.numel() * t.element_size() for field in self.state for t in field)

    def state_dict(self) -> dict:
        """This rank's state shard, the step and the plan it belongs to (tensors are copies)."""
        return state_io.shard_state_dict(self)

    def load_state_dict(self, sd: dict) -> None:
        """Restore a :meth:`state_dict` saved by the same rank of an identically planned run.

        Raises:
            ValueError: the plan, rank or rule differs (load a full state dict instead), or
                the state is sharded and replicated: a rank's shard alone cannot rebuild the
                copies its neighbours keep of it, so a later recovery would rebuild stale state.
        """
        state_io.check_shard_state_dict(self, sd)  # before anything changes
        self._will_write()
        state_io.load_shard_state_dict(self, sd)

    def full_state_dict(self) -> dict:
        """Gather the whole state, per parameter name; a collective, bucket by bucket."""
        return state_io.full_state_dict(self)

    def load_full_state_dict(self, full: dict) -> None:
        """Take this rank's shard of a :meth:`full_state_dict` (any world size or stage).

        With ``replicate=True`` every rank calls it, after loading the parameters: the
        in-memory redundancy is rebuilt from both.
        """
        self._will_write()
        state_io.load_full_state_dict(self, full)


def build_plan(names: Sequence[str], tensors: Sequence[torch.Tensor], world_size: int, zero_stage: int,
               bucket_bytes: int = DEFAULT_BUCKET_BYTES, last_bucket_bytes: int | None = 2**20) -> ShardPlan:
    """The plan a ShardedOptimizer with these arguments uses (a pure function).

    A module's parameters (names sharing the part before the last dot) share a bucket, so
    a bucket is complete as soon as backward is through its modules.
    """
    size = tensors[0].element_size()
    units = [n.rsplit(".", 1)[0] if "." in n else n for n in names]
    return plan([t.numel() for t in tensors], world_size if zero_stage >= 1 else 1, max(1, bucket_bytes // size),
                units=units, last_bucket_numel=max(1, last_bucket_bytes // size) if last_bucket_bytes else None)


def _named_tensors(params: Params) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(params, Mapping):
        names, tensors = [str(k) for k in params], list(params.values())
    elif isinstance(params, (list, tuple)):
        names, tensors = [str(i) for i in range(len(params))], list(params)
    else:
        raise TypeError(f"params must be a list of tensors or a name -> tensor dict, got {type(params).__name__}: "
                        f"pass list(model.parameters()) or dict(model.named_parameters())")
    if not tensors:
        raise ValueError("params is empty: pass the model's parameters")
    return names, tensors


def _check_args(tensors, rule, comm, zero_stage, bucket_bytes, max_grad_norm, wire_dtype) -> None:
    for name, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"params[{name}] must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}: cast with .float()")
    if len({t.dtype for t in tensors}) > 1 or len({t.device for t in tensors}) > 1:
        raise TypeError(f"params mix dtypes/devices {sorted({f'{t.dtype}@{t.device}' for t in tensors})}: "
                        f"one flat buffer holds them all; move the model with .to(dtype, device) first")
    if len({id(t) for t in tensors}) < len(tensors):
        raise ValueError("params lists the same tensor twice: pass each parameter once")
    if not all(hasattr(rule, m) for m in ("init", "update", "config")):
        raise TypeError(f"rule={rule!r} is not an update rule: use distopt.optim.sgd(...) or distopt.optim.adam(...)")
    if not all(hasattr(comm, m) for m in ("rank", "world_size", "allreduce", "reduce_scatter", "allgather")):
        raise TypeError(f"comm={comm!r} is not a Communicator: use distopt.collectives.TorchCommunicator or in_process")
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage={zero_stage!r} must be 0, 1 or 2")
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes!r} must be a positive int (default 25 MiB)")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} must be > 0, or None for no clipping")
    check_wire_dtype(wire_dtype, tensors[0].dtype)


def _match_grads(grads: Params, names: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    gnames, gs = _named_tensors(grads)
    if gnames != names:
        missing, extra = sorted(set(names) - set(gnames)), sorted(set(gnames) - set(names))
        raise ValueError(f"grads do not match params (missing {missing}, unexpected {extra}): pass the same "
                         f"structure (list of {len(names)} or dict with the same keys, same order)")
    for n, g, t in zip(names, gs, tensors):
        if not isinstance(g, torch.Tensor) or g.shape != t.shape:
            raise ValueError(f"grads[{n!r}] has shape {tuple(getattr(g, 'shape', ()))}, param has {tuple(t.shape)}")
    return gs
