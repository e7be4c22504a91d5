"""The worker: a plain class that builds the model, takes its data shard and runs a step.

No Ray here: the Ray actor (``group.py``) and the in-process thread group (``local.py``)
both wrap this class, so it is tested in one process and runs on a GPU box as it is.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from distopt.collectives.base import Communicator
from distopt.collectives.torch_dist import TorchCommunicator
from distopt.data import Feed
from distopt.data.feed import to_device
from distopt.data.sampling import fetch
from distopt.ft import Redundancy, recovery
from distopt.optim.hooks import StepHooks
from distopt.optim.params import plan_params
from distopt.optim.sharded import ShardedOptimizer
from distopt.runtime.param_groups import model_groups
from distopt.runtime.evaluation import EvalReport, eval_batches
from distopt.runtime.snapshots import Buffers, RunFields, shard_parts, snapshot
from distopt.runtime.faults import maybe_fire
from distopt.runtime.writer_process import make_writer
from distopt.runtime.config import TrainConfig


@dataclass
class StepReport:
    """One worker's account of one step, returned to the controller as data."""

    rank: int
    step: int  # 0-based sampling position of the step
    loss: float  # mean loss over this rank's samples
    metrics: dict = field(default_factory=dict)
    data_s: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    update_s: float = 0.0
    time_s: float = 0.0
    grad_norm: float = 0.0
    skipped: bool = False
    updates: int = 0  # optimizer updates applied so far
    checkpoints: list = field(default_factory=list)  # finished background checkpoint writes
    position: dict | None = None  # read position after the step (streams; None for map-style data)


class Worker:
    """One data-parallel rank: model, optimizer shard and the step loop body.

    Call order: ``Worker(config, rank, world_size)``, then ``attach(comm)`` (or
    ``connect(host, port)``), then ``run_step(k)`` for each step, identically on every rank.
    """

    def __init__(self, config: TrainConfig, rank: int, world_size: int | None = None, incarnation: int = 0,
                 device: torch.device | None = None) -> None:
        self.config, self.rank, self.incarnation = config, rank, incarnation
        self.world_size = world_size or config.num_workers
        self._step = -1  # 0-based step in flight, for fault injection
        self.device = device if device is not None else device_for(config.use_gpu)
        torch.manual_seed(config.seed)  # every rank builds the same initial weights
        model = config.model()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model() returned {type(model).__name__}, not a torch.nn.Module")
        self.model = model.to(self.device)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        # After the model: a data factory that draws random numbers must not change the initial weights.
        self.feed = Feed(config.data, config.seed, config.global_batch_size, config.gradient_accumulation_steps,
                         self.device, config.num_data_workers, config.prefetch)
        self.comm: Communicator | None = None
        self.optimizer: ShardedOptimizer | None = None
        self.ft: Redundancy | None = None  # the fault-tolerance layer on the optimizer's hooks
        self.replica_distance = 1  # rank r + d holds rank r's replica (chosen by node, see connect)
        # What this rank held at the last commit (old shard index -> packet), kept through the
        # attempts of one recovery (its ``episode``), so a recovery cut short by another
        # failure can be attempted again with the same offer.
        self._offer: dict[int, torch.Tensor] | None = None
        self._episode: int | None = None
        self._writer = make_writer(self.device, bool(config.checkpoint_dir))
        self._buffers = Buffers()
        self._run_fields = RunFields()
        self._last_step_s = 0.0

    def connect(self, host: str, port: int, group_name: str = "distopt", local_host: str | None = None,
                replica_distance: int = 1) -> None:
        """Join the collective group at rank 0's ``host:port`` and build the optimizer.

        ``local_host`` is the address this rank's transport binds to (its node's IP);
        ``replica_distance`` the group's (:func:`distopt.ft.redundancy.replica_distance`).
        """
        c = self.config
        self.attach(TorchCommunicator(self.rank, self.world_size, host, port, c.backend, c.collective_timeout_s,
                                      group_name=group_name, local_host=local_host or _local_host(host)),
                    replica_distance)

    def attach(self, comm: Communicator, replica_distance: int = 1) -> None:
        """Use an existing communicator (in-process groups) and build the optimizer."""
        self._drop_optimizer()
        self.comm, self.replica_distance = comm, replica_distance
        self.optimizer = self._optimizer(comm, sync_params=True)

    def _drop_optimizer(self) -> None:
        if self.optimizer is not None:
            self.optimizer.close()  # its gradient hooks must not fire into a dead optimizer
        self.optimizer, self.ft = None, None

    def opt_params(self) -> Any:
        """What the optimizer is built over: the trainable parameters by name, or the groups of
        ``param_groups(model)`` (:mod:`distopt.runtime.param_groups`)."""
        fn = self.config.param_groups
        return self.params if fn is None else model_groups(fn, self.model)

    def _optimizer(self, comm: Communicator, sync_params: bool) -> ShardedOptimizer:
        c = self.config
        opt = ShardedOptimizer(self.opt_params(), c.optimizer, comm, zero_stage=c.zero_stage, bucket_bytes=c.bucket_bytes,
                               max_grad_norm=c.max_grad_norm, sync_params=sync_params,
                               wire_dtype=c.grad_wire_dtype, last_bucket_bytes=c.last_bucket_bytes)
        try:
            opt.register_hooks(_RankHooks(self))
            if c.fault_tolerant:  # a collective: a peer lost meanwhile makes it raise
                self.ft = Redundancy(opt, self.replica_distance, c.shared_memory, c.replica_log_depth)
            parts = shard_parts(opt, self.rank)
            if c.checkpoint_dir and parts is not None:
                self._writer.reserve(sum(t.numel() * t.element_size() for ts in parts.values() for t in ts),
                                     self.device)
        except BaseException:
            opt.close()  # its gradient hooks would fire in every later backward, into buckets never reduced again
            self.ft = None
            raise
        return opt

    def _inject(self, phase: str) -> None:
        maybe_fire(self.config.faults, self.rank, self.incarnation, self._step, phase)

    def recover(self, host: str, port: int, group_name: str, rank: int, world_size: int, committed: int,
                holder_of: list[int], old_world: int, keep: int | None = None, local_host: str | None = None,
                episode: int = 0, replica_distance: int = 1) -> None:
        """Rejoin a re-formed group and return to update ``committed``; a collective.

        Survivors roll back their shard and offer it (and their neighbour's replica); a
        fresh replacement offers nothing. Every rank then rebuilds the committed parameters
        and state. The first ``keep`` ranks (all by default) go on in a group of their own
        and take their shard of the new plan; the others are left idle, to be dropped.

        If another rank fails meanwhile, this raises and may be called again with the same
        ``episode`` (and a new group and holders): it offers again what it held at the
        commit, whatever the first attempt got through. A new ``episode`` starts from what
        the rank holds now. ``holder_of`` names shards by their rank at the commit;
        ``replica_distance`` is the one the group that goes on uses.
        """
        self._inject("recovery")
        self._writer.freeze()  # the parameters are rewritten below, whatever the optimizer does
        if self._offer is None or self._episode != episode:  # the first attempt of this recovery
            self._offer, self._episode = {}, episode
            if self.optimizer is not None:
                if self.ft is None:
                    raise recovery.RecoveryError("a rank without fault tolerance cannot roll back: train with "
                                                 "max_failures > 0, or restore a checkpoint")
                self.ft.rollback(committed)
                self._offer = recovery.packets(self.optimizer, self.ft, self.rank)
        self._leave_group()
        self.rank, self.world_size = rank, world_size
        c = self.config
        comm = TorchCommunicator(rank, world_size, host, port, c.backend, c.collective_timeout_s,
                                 group_name=group_name, local_host=local_host or _local_host(host))
        old = plan_params(self.opt_params(), c.optimizer, old_world, c.zero_stage, c.bucket_bytes, c.last_bucket_bytes)
        tensors = old.tensors
        try:
            params, full = recovery.assemble(comm, old.plan, c.optimizer, old.fields, old.names,
                                             [t.shape for t in tensors], holder_of, self._offer, committed,
                                             tensors[0].dtype, tensors[0].device)
        except Exception:
            comm.close()  # a peer failed: the group is useless, and its threads and sockets must go
            raise
        with torch.no_grad():
            for name, t in self.params.items():
                t.copy_(params[name])
        keep = world_size if keep is None else keep
        if keep < world_size:
            # The kept ranks need a group of their own size; rank 0's store serves it too.
            try:
                kept = TorchCommunicator(rank, keep, host, port, c.backend, c.collective_timeout_s, store=comm.store,
                                         group_name=group_name + "/kept") if rank < keep else None
            finally:
                comm.close()
            comm, self.world_size = kept, keep
        self._drop_optimizer()
        self.comm, self.replica_distance = comm, replica_distance
        if comm is not None:
            self.optimizer = self._optimizer(comm, sync_params=False)
            self._load_state(full)

    def rejoin(self, host: str, port: int, group_name: str, rank: int, world_size: int,
               local_host: str | None = None, replica_distance: int = 1) -> None:
        """Join a re-formed group as ``rank`` of ``world_size`` with nothing to restore from
        memory; a collective. The caller loads a checkpoint next (:meth:`load`)."""
        self._inject("recovery")
        self._writer.freeze()
        self._offer = None
        self._leave_group()
        self._drop_optimizer()
        self.rank, self.world_size = rank, world_size
        self.connect(host, port, group_name, local_host, replica_distance)

    def run_step(self, step: int, position: dict | None = None) -> StepReport:
        """Compute this rank's gradients for 0-based ``step``, then the sharded update.

        ``position`` is the committed read position of a stream at the step's start (None
        for map-style data, or at step 0); the report carries the position after it."""
        start = time.perf_counter()
        c = self.config
        self._step = step
        self._offer = None  # any recovery before this step is complete
        self._writer.advance(0.5 * self._last_step_s)  # a checkpoint's next piece to the host lands meanwhile
        self._inject("data")
        if self.ft is not None:
            self.ft.commit(self.optimizer.step_count)  # the controller sends a step once the last one committed
        chunks, after, data_s = self.feed.batches(step, position, self.rank, self.world_size)
        losses, metrics = [], {}
        self.optimizer.zero_grad()
        for m, batch in enumerate(chunks):
            self._inject("compute")
            # Buckets reduce while the last micro-batch's backward runs (all at step without overlap).
            reduce_now = c.overlap and m == len(chunks) - 1
            with contextlib.nullcontext() if reduce_now else self.optimizer.no_sync():
                loss, extra = self._backward(batch, len(chunks))
            losses.append(loss)
            metrics = _add_metrics(metrics, extra)
        compute_s = time.perf_counter() - start - data_s
        self.optimizer.step()
        info = self.optimizer.info
        if c.checkpoint_dir and c.checkpoint_every and (step + 1) % c.checkpoint_every == 0:
            self.checkpoint(step + 1)
        written = self._writer.drain(before=self._write_deadline(step))
        # Losses and metrics stay on the device until the update is queued: one wait, at the end.
        losses, metrics = [float(v) for v in losses], {k: float(v) for k, v in metrics.items()}
        self._last_step_s = time.perf_counter() - start
        return StepReport(self.rank, step, sum(losses) / len(losses), {k: v / len(losses) for k, v in metrics.items()},
                          data_s, compute_s, info.comm_s, info.update_s, self._last_step_s,
                          info.grad_norm, info.skipped, info.step, written, after)

    def evaluate(self, step: int) -> EvalReport:
        """Evaluate this rank's batches of ``eval_data`` on the weights after ``step`` committed
        steps, without gradients, in eval mode, leaving the random state as it was."""
        start = time.perf_counter()
        c = self.config
        self._step = step
        self._inject("eval")
        fn = c.eval_fn or c.loss
        out = []
        was_training = self.model.training
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=c.mixed_precision == "bf16"):
            self.model.eval()
            try:
                for index, lo, hi in eval_batches(len(c.eval_data), c.eval_chunk, self.rank, self.world_size):
                    result = fn(self.model, to_device(fetch(c.eval_data, list(range(lo, hi))), self.device))
                    y, extra = (result[0], result[1] if len(result) > 1 else {}) if isinstance(result, tuple) \
                        else (result, {})
                    out.append((index, hi - lo, {"loss": _scalar(y, "eval loss"),
                                                 **{k: _scalar(v, f"eval metric {k!r}") for k, v in extra.items()}}))
            finally:
                self.model.train(was_training)
        batches = [(i, n, {k: float(v) for k, v in values.items()}) for i, n, values in out]  # one device wait
        return EvalReport(self.rank, step, batches, time.perf_counter() - start)

    def _backward(self, batch: Any, micro_batches: int) -> tuple[torch.Tensor, dict]:
        # Gradients accumulate straight into the optimizer's bucket memory (no second copy);
        # the mean over micro-batches is their sum of loss / micro_batches.
        # bf16 autocast computes in bf16 from the fp32 master weights; gradients come back fp32.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.mixed_precision == "bf16"):
            out = self.config.loss(self.model, batch)
        y, extra = (out[0], out[1] if len(out) > 1 else {}) if isinstance(out, tuple) else (out, {})
        if not isinstance(extra, dict):
            raise TypeError(f"loss returned (loss, {type(extra).__name__}): the second item must be a metrics dict")
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            raise TypeError("the loss must be a tensor computed from the model's parameters (it does not require grad)")
        loss = _scalar(y, "loss")
        (y.reshape(()) / micro_batches if micro_batches > 1 else y.reshape(())).backward()
        return loss, {k: _scalar(v, f"metric {k!r}") for k, v in extra.items()}

    def _write_deadline(self, step: int) -> int:
        # A background write may overlap half a checkpoint interval, then the step waits for
        # it: its record then reaches the driver long before the next checkpoint starts.
        return step + 1 - max(1, self.config.checkpoint_every // 2)

    def checkpoint(self, steps_done: int, wait: bool = False) -> list[dict]:
        """Start writing this rank's part of the checkpoint after ``steps_done`` steps, in the
        background: on CPU the shard is read in place until the next update (``live_shard``),
        on GPU a device copy goes to a writer process (``writer_process``)."""
        self._inject("checkpoint")
        c = self.config
        # The last write's memory is reused unless that write still runs (checkpoint_every=1).
        reuse = None if self._writer.busy() else self._buffers
        snap = snapshot(self.optimizer, self.model, self.rank, c.seed, steps_done, self.rank == 0, reuse,
                        live=self._writer.reads_live, run_fields=self._run_fields,
                        data_position=self.feed.position_at(steps_done))
        if snap.shard is not None or snap.model is not None:
            self._writer.start(c.checkpoint_dir, steps_done, self.rank, snap.shard, snap.model, snap.fields, snap.live)
        return self._writer.drain(wait=True) if wait else []

    def flush_checkpoints(self) -> list[dict]:
        """Wait for background writes; their records."""
        return self._writer.drain(wait=True)

    def load(self, model_state: dict, full_state: dict) -> None:
        """Take weights and optimizer state from a checkpoint (any world size or stage wrote it)."""
        self._writer.freeze()
        self.model.load_state_dict(model_state)  # copies into the flat buffer's views
        self._load_state(full_state)

    def _load_state(self, full_state: dict) -> None:
        self.optimizer.load_full_state_dict(full_state)  # (the redundancy rebuilds its copies on its hook)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict()`` with every tensor copied to CPU."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def info(self) -> dict:
        """Facts the driver reports: state bytes, parameter count, process."""
        opt = self.optimizer
        numel = sum(p.numel() for p in self.params.values())
        fields = sum(1 for f in opt.shard_state if f) if opt else 0
        elem = next(iter(self.params.values())).element_size()
        return {"rank": self.rank, "pid": os.getpid(), "num_params": numel,
                "state_bytes": opt.state_bytes() if opt else 0, "state_bytes_unsharded": numel * fields * elem}

    def close(self) -> None:
        """Release the collective group and the checkpoint writer's thread."""
        self._leave_group()
        self._writer.close()
        self.feed.close()

    def _leave_group(self) -> None:
        if self.comm is not None and hasattr(self.comm, "close"):  # in-process groups may not close
            self.comm.close()
        self.comm = None


class _RankHooks(StepHooks):
    """The worker's own watch on its optimizer: fault injection, and a checkpoint that may
    still read the shard in place lets go before it changes."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker

    def phase(self, name: str, step: int) -> None:
        if self.worker.config.faults:
            self.worker._inject(name)

    def before_write(self) -> None:
        self.worker._writer.freeze()


def device_for(use_gpu: bool, index: int = 0) -> torch.device:
    """CPU, or CUDA device ``index`` modulo the devices this process sees."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but this worker sees no CUDA device: check the node's GPUs and drivers")
    # On Ray, CUDA_VISIBLE_DEVICES holds this worker's one GPU, so index 0 is it.
    return torch.device("cuda", index % torch.cuda.device_count())


def _local_host(host: str) -> str | None:
    return "127.0.0.1" if host in ("127.0.0.1", "localhost") else None


def _add_metrics(into: dict, extra: dict) -> dict:
    return {**into, **{k: into[k] + v if k in into else v for k, v in extra.items()}}


def _scalar(v: Any, what: str) -> Any:
    """A one-element value, left where it is (a device tensor is read once, after the update)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"the {what} has shape {tuple(v.shape)}: return a scalar (e.g. .mean())")
        return v.detach().reshape(())
    return float(v)

