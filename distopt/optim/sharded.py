"""ShardedOptimizer: a ``torch.optim.Optimizer`` with ZeRO stages 0, 1 and 2 over any Communicator.

The parameters are re-pointed at views of flat buffers (one per dtype) cut into buckets;
their identity is kept, so the model sees every update. Each step reads top to bottom:

    reduce   each gradient bucket is averaged into this rank's shard of it (reduce-scatter;
             at zero_stage 0 the plan has one shard, which is the whole bucket: allreduce),
             mostly while backward still runs (:mod:`distopt.optim.reducer`)
    norm     the global gradient norm; a non-finite one skips the step on every rank, a
             large one is clipped to ``max_grad_norm`` (:mod:`distopt.optim.norm`)
    update   every group's rule on this rank's shard, with the group's hyperparameters now
    gather   the new parameter shards to every rank (nothing to do with one shard)

Stage 1 keeps a full-size gradient buffer that ``.grad`` views (written once, by autograd);
stage 2 keeps only this rank's gradient shard and packs a bucket at a time. World size 1
runs the same code; the communicator skips the wire.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from distopt.collectives.base import Communicator, check_wire_dtype
from distopt.collectives.buckets import DEFAULT_BUCKET_BYTES
from distopt.optim import state_io
from distopt.optim.flat import adopt_grads, adopt_params, shard_views
from distopt.optim.group_rules import GroupRules, state_bytes
from distopt.optim.hooks import StepHooks
from distopt.optim.norm import clip_scale, global_norm
from distopt.optim.params import check_args, check_comm, check_devices, match_grads, normalize, plan_params
from distopt.optim.reducer import Reducer
from distopt.optim.rules import Rule, hyperparameters
from distopt.optim.step_info import StepClock, StepInfo

log = logging.getLogger("distopt")


class ShardedOptimizer(torch.optim.Optimizer):
    """Data-parallel optimizer with sharded state; a torch optimizer (see the module docstring).

    Args:
        params: tensors, ``(name, tensor)`` pairs, a ``name -> tensor`` dict, or parameter
            groups: dicts with ``"params"`` and overrides of the rule's hyperparameters
            (``lr``, ``weight_decay``, ...). ``requires_grad=False`` tensors are frozen (no
            state, no traffic); a tensor listed twice is one parameter. dtypes may mix.
        rule: ``distopt.optim.sgd(...)`` or ``distopt.optim.adam(...)``; its hyperparameters
            are the groups' defaults.
        comm: this rank's communicator; None uses torch.distributed's default group (as
            under torchrun). Every rank constructs its optimizer in the same order.
        zero_stage: 0, 1 or 2.
        bucket_bytes: cap on one collective's buffer.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        wire_dtype: ``torch.bfloat16``/``torch.float16`` to narrow gradients on the wire.
        sync_params: broadcast rank 0's parameters at construction, so all ranks start equal.
        last_bucket_bytes: cap on the bucket of the last parameters, reduced first while
            backward is still running (1 MiB, as DDP's first bucket); None: ``bucket_bytes``.

    Raises:
        TypeError, ValueError: bad arguments, before any communication.
        RuntimeError: ``comm=None`` without an initialised default process group.
    """

    def __init__(self, params: Any, rule: Rule, comm: Communicator | None = None, zero_stage: int = 1,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, max_grad_norm: float | None = None,
                 wire_dtype: torch.dtype | None = None, sync_params: bool = True,
                 last_bucket_bytes: int | None = 2**20) -> None:
        check_args(rule, zero_stage, bucket_bytes, max_grad_norm)
        params = list(params) if isinstance(params, Iterator) else params  # (read twice below)
        groups, managed = normalize(params, rule)  # bad parameters fail before the process group is looked up
        for dtype in {t.dtype for t in managed.tensors}:
            check_wire_dtype(wire_dtype, dtype)
        self.device = check_devices(managed.tensors)
        if comm is None:
            from distopt.collectives.torch_dist import TorchCommunicator
            comm = TorchCommunicator.from_process_group(None)
        check_comm(comm)
        planned = plan_params(params, rule, comm.world_size, zero_stage, bucket_bytes, last_bucket_bytes)
        self.rule = rule
        super().__init__(planned.groups, hyperparameters(rule))
        self.comm, self.zero_stage = comm, zero_stage
        self.max_grad_norm, self.wire_dtype = max_grad_norm, wire_dtype
        self.plan, self.arrangement, self.names, self.tensors = planned[1:5]  # names and tensors in plan order
        self.rules = GroupRules(rule, self.param_groups, self.arrangement.bucket_group,
                                self.arrangement.bucket_dtype, self.plan, [t.shape for t in self.tensors])
        log.debug("rank %d: %s", comm.rank, self.plan.describe())
        self.params_flat = adopt_params(self.tensors, self.plan, self.arrangement, self.device)
        if sync_params:
            for flat in self.params_flat.flats():
                comm.broadcast(flat, src=0)
        self.shard_rank = comm.rank if self.plan.world_size > 1 else 0  # whose slice of each bucket this rank updates
        ranges = self.plan.ranges(self.shard_rank)
        self.shard_params = [self.params_flat.range(s, e) for s, e in ranges]
        self.grad_buckets = adopt_grads(self.tensors, self.plan, self.arrangement, self.device) \
            if zero_stage <= 1 else None
        # Kept buckets are reduced in place: this rank's shard of a bucket is its own slice of it.
        self.grad_flat, self.grad_shards = (None, [self.grad_buckets.range(s, e) for s, e in ranges]) \
            if self.grad_buckets is not None else shard_views(ranges, self.arrangement.bucket_dtype, self.device)
        self.shard_state = self.init_state(self.shard_params)
        self.step_count = 0
        self.info: StepInfo | None = None  # the last step's
        self._hooks: list[StepHooks] = []
        self.reducer = Reducer(self)
        self.reducer.narrow_blocks = zero_stage == 0 and wire_dtype is not None

    # --- set-up ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Groups are fixed once the plan is made; torch calls this while constructing."""
        if getattr(self, "plan", None) is not None:
            raise RuntimeError("ShardedOptimizer cannot add a parameter group after construction (the sharding "
                               "plan is made from all groups): pass every group to the constructor")
        # Not torch's own: it is wrapped to disable dynamo, which imports torch._dynamo (seconds
        # in a fresh process, a replacement's recovery among them). normalize() checked the group.
        own = param_group.get("rule")
        self.param_groups.append({**(hyperparameters(own) if own is not None else self.defaults), **param_group})

    # --- hooks ----------------------------------------------------------------------
    def register_hooks(self, hooks: StepHooks) -> Callable[[], None]:
        """Call ``hooks`` at the points of every step (:mod:`distopt.optim.hooks`); returns
        a function that removes them."""
        self._hooks.append(hooks)
        return lambda: self._hooks.remove(hooks) if hooks in self._hooks else None

    def notify_write(self) -> None:
        """Tell the hooks this rank's shard is about to change in place outside a step (a
        layer that restores it: a rollback)."""
        self._call("before_write")

    def init_state(self, params: list[torch.Tensor], buckets: Sequence[int] | None = None) -> dict:
        """Fresh (zero) optimizer state for pieces ``params`` of ``buckets`` (default: one
        per bucket), each with the fields its group's rule keeps: what a copy of a shard's
        state needs (:mod:`distopt.optim.group_rules`)."""
        return self.rules.init(params, buckets)

    def use_grad_shards(self, flat: torch.Tensor) -> None:
        """Reduce the next step's gradients into ``flat`` (this rank's shard size, one
        dtype): a replica log keeps them where a neighbour reads them. Between steps only."""
        if self.plan.world_size == 1 or len(self.params_flat.segments) > 1:
            raise TypeError("use_grad_shards needs a sharded plan (zero_stage >= 1, world_size > 1) and parameters "
                            "of one dtype")
        self.grad_flat = flat
        self.grad_shards = list(flat.split([t.numel() for t in self.shard_params]))

    def _call(self, point: str, *args: Any) -> None:
        for h in self._hooks:
            getattr(h, point)(*args)

    # --- the step -------------------------------------------------------------------
    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients over several backward passes without reducing them (as
        DDP's ``no_sync``): every backward but the last of a step runs inside. Gradients are
        summed, so scale each micro-batch's loss by ``1 / micro_batches`` for their mean."""
        with self.reducer.no_sync():
            yield

    def step(self, closure: Callable[[], Any] | None = None, *, grads: Any = None) -> Any:
        """Average gradients over ranks and apply one update; a collective.

        Every rank calls it once per step. Gradients come from ``.grad`` (reduced while
        backward ran, or now), or from ``grads`` (same names or order as the parameters).
        Afterwards every rank holds identical parameters; :attr:`info` says what happened.
        At stage >= 1 ``.grad`` then holds unspecified values: :meth:`zero_grad` before the
        next backward.

        Returns:
            The closure's loss (None without a closure), as torch optimizers do.

        Raises:
            ValueError: ``grads`` does not match the parameters.
            CollectiveError: a peer failed; parameters and state are then unspecified
                (roll back with :mod:`distopt.ft`, or restore a checkpoint).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        given = None if grads is None else match_grads(grads, self.names, self.tensors, self.arrangement.order)
        step, clock = self.step_count + 1, StepClock()
        self._call("phase", "grad_collective", step)
        self.reducer.finish(given)
        clock.lap("comm")
        self._call("grads_reduced", step)
        clock.lap("update")
        norm = global_norm(self.grad_shards, self.comm, self.plan.world_size)
        clock.lap("comm")
        if not math.isfinite(norm):
            log.warning("rank %d: non-finite gradient (norm %s): step %d skipped on every rank",
                        self.comm.rank, norm, step)
            self.info = StepInfo(self.step_count, norm, True, clock.comm, clock.update)
            return loss
        self._update(step, clip_scale(norm, self.max_grad_norm))
        clock.lap("update")
        self._call("phase", "param_gather", step)
        self._gather()
        self.step_count = step
        clock.lap("comm")
        self._call("after_gather", step)
        clock.lap("update")
        self.info = StepInfo(step, norm, False, clock.comm, clock.update)
        return loss

    def reduce_bucket(self, b: int, flat: torch.Tensor):
        """Start averaging gradient bucket ``b`` (in ``flat``) into this rank's shard of it."""
        if self.zero_stage == 0:  # the one shard is the bucket itself
            return self.comm.allreduce(flat, "mean", self.wire_dtype, async_op=True)
        return self.comm.reduce_scatter(flat, "mean", self.wire_dtype, out=self.grad_shards[b], async_op=True)

    def _update(self, step: int, scale: float) -> None:
        self.rules.at(step)  # (a bad hyperparameter raises here, before anything changes)
        self._call("before_update", step, scale)
        self._call("phase", "shard_update", step)
        self._call("before_write")
        self.rules.apply(step, range(len(self.shard_params)), self.shard_params, self.grad_shards, self.shard_state,
                         scale, self.shard_rank)
        self._call("after_update", step)

    def _gather(self) -> None:
        if self.plan.world_size == 1:
            return
        gathers = [self.comm.allgather(shard, out=self.params_flat.bucket(b), async_op=True)
                   for b, shard in enumerate(self.shard_params)]
        for g in gathers:
            g.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients. At zero_stage 0/1 ``.grad`` stays a view of the gradient
        bucket, zeroed in place whatever ``set_to_none`` says (the bucket is the memory
        backward writes into); at zero_stage 2 gradients become None."""
        if self.grad_buckets is None:
            for t in self.tensors:
                t.grad = None
            return
        for flat in self.grad_buckets.flats():
            flat.zero_()
        for t, view in zip(self.tensors, self.grad_buckets.views):
            t.grad = view

    def close(self) -> None:
        """Remove the gradient hooks (this optimizer is being replaced)."""
        self.reducer.close()

    # --- state ----------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (moments, momentum buffers)."""
        return state_bytes(self.shard_state)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this optimizer holds, by what they are: the parameters' flat buffers, the
        full-size gradient buckets (stage 0/1), this rank's gradient shards where they are not
        slices of those buckets (stage 2),
        the state shard, and the stage-2 packing buffers. ``.grad`` tensors autograd
        allocates outside bucket memory (stage 2, between hooks) are not counted."""
        return state_io.memory_bytes(self)

    def state_dict(self) -> dict:
        """This rank's state shard, the step, the groups' hyperparameters and the plan (copies)."""
        return state_io.shard_state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` saved by the same rank of an identically planned run.

        Raises:
            ValueError: the plan, rank, rule or groups differ (load a full state dict instead).
        """
        state_io.check_shard_state_dict(self, state_dict)  # before anything changes
        self._load(state_io.load_shard_state_dict, state_dict, full=False)

    def full_state_dict(self) -> dict:
        """Gather the whole state, per parameter name; a collective, bucket by bucket."""
        return state_io.full_state_dict(self)

    def load_full_state_dict(self, full: dict) -> None:
        """Take this rank's shard of a :meth:`full_state_dict` (any world size or stage); with
        a fault-tolerance layer on the hooks every rank calls it (its copies are rebuilt)."""
        state_io.check_full_state_dict(self, full)
        self._load(state_io.load_full_state_dict, full, full=True)

    def _load(self, load: Callable[[Any, dict], None], sd: dict, full: bool) -> None:
        # The hooks see a load coming (and may refuse it), then the state it left.
        self._call("before_load", full)
        self._call("before_write")
        load(self, sd)
        self._call("after_load", sd if full else None)
