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
from distopt.data import Feed
from distopt.data.feed import to_device
from distopt.data.sampling import fetch
from distopt.ft import Redundancy
from distopt.optim.hooks import StepHooks
from distopt.optim.sharded import ShardedOptimizer
from distopt.runtime.param_groups import model_groups
from distopt.runtime.evaluation import EvalReport, eval_batches
from distopt.runtime.snapshots import Buffers, RunFields, shard_parts, snapshot
from distopt.runtime.faults import maybe_fire
from distopt.runtime.outputs import add_metrics, scalar, split_output
from distopt.runtime.writer_process import make_writer
from distopt.runtime.config import TrainConfig
from distopt.runtime.worker_recovery import RankRecovery, join_group


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


class Worker(RankRecovery):
    """One data-parallel rank: model, optimizer shard and the step loop body.

    Call order: ``Worker(config, rank, world_size)``, then ``attach(comm)`` (or
    ``connect(host, port)``), then ``run_step(k)`` for each step, identically on every rank.
    After a failure, ``recover`` or ``rejoin`` (:mod:`distopt.runtime.worker_recovery`).
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
        self._offer: dict[int, torch.Tensor] | None = None  # what this rank held at the last commit (RankRecovery)
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
        self.attach(join_group(self.config, self.rank, self.world_size, host, port, group_name, local_host),
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
            metrics = add_metrics(metrics, extra)
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
                    batch = to_device(fetch(c.eval_data, list(range(lo, hi))), self.device)
                    y, extra = split_output(fn(self.model, batch))
                    out.append((index, hi - lo, {"loss": scalar(y, "eval loss"),
                                                 **{k: scalar(v, f"eval metric {k!r}") for k, v in extra.items()}}))
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
        y, extra = split_output(out)
        if not isinstance(extra, dict):
            raise TypeError(f"loss returned (loss, {type(extra).__name__}): the second item must be a metrics dict")
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            raise TypeError("the loss must be a tensor computed from the model's parameters (it does not require grad)")
        loss = scalar(y, "loss")
        (y.reshape(()) / micro_batches if micro_batches > 1 else y.reshape(())).backward()
        return loss, {k: scalar(v, f"metric {k!r}") for k, v in extra.items()}

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

