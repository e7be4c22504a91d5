"""``distopt.Trainer``: the user's model trained data-parallel on Ray (or in-process).

The driver is the step controller: it sends step k to every worker, collects their
reports as data, and commits k when all are in. Ray is set up here and torn down after
``fit`` (also when it raises) when this Trainer started it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from distopt.data import kind_of, positions
from distopt.ft.replica_log import DEPTH as REPLICA_LOG_DEPTH
from distopt.optim.rules import Rule
from distopt.runtime.config import TrainConfig
from distopt.runtime.checkpointing import load_for_resume
from distopt.runtime.controller import Controller, RunFailed
from distopt.runtime.progress import RunLog

log = logging.getLogger("distopt")


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns."""

    state_dict: dict  # final model weights, name -> CPU tensor
    history: list[dict]  # one dict per step: step, loss, time_s, ... and user metrics
    failures: list[dict] = field(default_factory=list)  # what failed and how it was recovered
    summary: dict = field(default_factory=dict)
    growths: list[dict] = field(default_factory=list)  # after a shrink: step, world size, seconds


class Trainer:
    """Data-parallel training with sharded optimizer state (contract in DESIGN.md).

    Args:
        model: zero-arg callable returning an ``nn.Module``; every worker seeds then calls it.
        loss: ``(model, batch) -> loss`` or ``(loss, metrics_dict)``; ``loss`` a scalar tensor.
        data: a map-style dataset (a batch is ``default_collate([data[i] for i in indices])``),
            a torch ``IterableDataset``, ``distopt.data.shards(paths, read)``, a
            ``ray.data.Dataset``, or a zero-argument module-level factory of one of them
            (called on each worker); the order each is read in is in the README ("Data").
        optimizer: ``distopt.optim.adam(...)`` or ``distopt.optim.sgd(...)``.
        global_batch_size: samples per step over all workers and micro-batches.
        num_workers: data-parallel ranks (Ray actors).
        use_gpu: one GPU per worker, CUDA tensors and NCCL (with ``ray_address="local"``
            the threads share this process's GPUs over gloo).
        zero_stage: 0 (replicated state), 1 (sharded state) or 2 (sharded state and gradients).
        seed: model initialisation and sampling seed.
        gradient_accumulation_steps: micro-batches per worker per step.
        max_grad_norm: clip the global gradient norm (None: off).
        log_every: plain log line every N steps when not on a terminal (0: silent).
        out_dir: write ``metrics.jsonl``, ``loss.png`` and ``summary.json`` here.
        progress: progress bar on/off (None: only when stderr is a terminal).
        ray_address: None starts an embedded loopback cluster; ``"auto"`` or
            ``"ray://host:port"`` joins one; ``"local"`` runs without Ray (threads).
        num_cpus_per_worker, placement_strategy: Ray placement of each worker.
        collective_timeout_s: seconds a collective may block before the step fails.
        bucket_bytes: cap on one gradient bucket (one collective each, overlapped with backward).
        grad_wire_dtype: ``torch.bfloat16``/``torch.float16`` to send gradients narrowed
            (summed in fp32 on arrival); None sends fp32.
        mixed_precision: ``"bf16"`` runs forward and backward under bf16 autocast; weights,
            gradients and optimizer state stay fp32.
        max_failures: worker failures survived before the run gives up; 0 turns fault
            tolerance (and its in-memory redundancy) off.
        min_workers: fewest workers a shrink may leave when no replacement can be placed.
        replace_timeout_s: seconds to wait for a replacement worker before shrinking.
        spare_workers: idle workers kept with the model built, each ready to take a lost
            rank at once (they hold their resources the whole run).
        step_timeout_s: a step that takes longer counts its silent workers as hung.
        grow_back: after a shrink, bring the group back towards ``num_workers`` when the
            dropped ranks' resources return (checked between steps, never waiting).
        shared_memory: workers on one host keep the fault-tolerance redundancy in shared
            memory (``/dev/shm``) instead of sending it and snapshotting every step; False
            takes the across-hosts path everywhere (so does ``DISTOPT_SHM=0``).
        replica_log_depth: with shared memory, each worker logs ``depth + 1`` steps of
            gradient shards and copies ``1/depth`` of its shard per step where its holder
            can read them: higher is faster and takes more memory (``distopt.ft.replica_log``).
        faults: ``distopt.runtime.faults.Fault`` records that kill or stop workers on
            purpose (chaos testing).
        checkpoint_dir: write checkpoints here (``step-N`` folders); one at the end of ``fit``.
        checkpoint_every: also every N steps, written in the background (0: only at the end).
        keep_last: complete checkpoints kept; older ones are removed.
        resume_from: a checkpoint folder, or a checkpoint root (the newest that verifies);
            any ``num_workers`` and ``zero_stage`` may resume it (a stream at the next sample).
        num_data_workers: background loader processes per worker (0: batches are read on
            the training thread when the step needs them).
        prefetch: steps each loader process keeps ready (pinned memory on a GPU).

    Raises:
        TypeError, ValueError: bad arguments, before anything starts.
    """

    def __init__(self, model: Callable[[], Any], loss: Callable, data: Any, optimizer: Rule,
                 global_batch_size: int, num_workers: int = 2, use_gpu: bool = False, zero_stage: int = 1,
                 seed: int = 0, gradient_accumulation_steps: int = 1, max_grad_norm: float | None = None,
                 log_every: int = 10, out_dir: str | None = None, progress: bool | None = None,
                 ray_address: str | None = None, num_cpus_per_worker: float = 1, placement_strategy: str = "PACK",
                 collective_timeout_s: float = 60.0, placement_timeout_s: float = 30.0,
                 bucket_bytes: int = 25 * 2**20, grad_wire_dtype: Any = None, mixed_precision: str | None = None,
                 max_failures: int = 3, min_workers: int = 1,
                 replace_timeout_s: float = 30.0, spare_workers: int = 0, step_timeout_s: float = 300.0,
                 grow_back: bool = True, shared_memory: bool = True, replica_log_depth: int = REPLICA_LOG_DEPTH,
                 faults: tuple = (),
                 checkpoint_dir: str | None = None, checkpoint_every: int = 0, keep_last: int = 3,
                 resume_from: str | None = None, num_data_workers: int = 0, prefetch: int = 2) -> None:
        self.config = TrainConfig(
            model=model, loss=loss, data=data, optimizer=optimizer, global_batch_size=global_batch_size,
            num_workers=num_workers, use_gpu=use_gpu, zero_stage=zero_stage, seed=seed,
            gradient_accumulation_steps=gradient_accumulation_steps, max_grad_norm=max_grad_norm,
            bucket_bytes=bucket_bytes, grad_wire_dtype=grad_wire_dtype, mixed_precision=mixed_precision,
            num_cpus_per_worker=num_cpus_per_worker,
            placement_strategy=placement_strategy, collective_timeout_s=collective_timeout_s,
            placement_timeout_s=placement_timeout_s, max_failures=max_failures, min_workers=min_workers,
            replace_timeout_s=replace_timeout_s, spare_workers=spare_workers, step_timeout_s=step_timeout_s,
            grow_back=grow_back, shared_memory=shared_memory, replica_log_depth=replica_log_depth,
            faults=tuple(faults),
            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), checkpoint_every=checkpoint_every,
            keep_last=keep_last, num_data_workers=num_data_workers, prefetch=prefetch)
        if not isinstance(log_every, int) or log_every < 0:
            raise ValueError(f"log_every={log_every!r} must be an int >= 0 (0: no log lines)")
        if checkpoint_every and checkpoint_dir is None:
            raise ValueError(f"checkpoint_every={checkpoint_every} needs a checkpoint_dir to write to")
        self.resume_from = None if resume_from is None else str(resume_from)
        self.log_every, self.out_dir, self.progress = log_every, out_dir, progress
        self.ray_address = ray_address

    def fit(self, steps: int) -> FitResult:
        """Train until the step count reaches ``steps``; returns weights, history, failures.

        Raises:
            ValueError: ``steps`` is not a positive int.
            WorkerError: user code raised in a worker (rank and traceback in the message).
            WorkerLost: a worker died (fault tolerance arrives in a later milestone).
            PlacementError: the cluster cannot hold the workers.
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps={steps!r} must be a positive int")
        resume = load_for_resume(self.resume_from) if self.resume_from else None  # a bad checkpoint fails here
        if resume is not None:  # a stream resumed from a map-style run's checkpoint (or back) fails here too
            positions.for_resume(kind_of(self.config.data), resume.manifest.get("data_position"),
                                 resume.manifest["next_step"], f"checkpoint {self.resume_from}")
        with _Cluster(self.ray_address, self.config) as cluster:
            group = cluster.group()
            try:
                return self._loop(group, steps, resume)
            finally:
                group.close()

    def _loop(self, group: Any, steps: int, resume: Any) -> FitResult:
        c = self.config
        start, updates, position = 0, 0, None
        if resume is not None:
            group.load(resume.model_state, resume.optimizer_state)
            start, updates = resume.manifest["next_step"], resume.manifest["optimizer_step"]
            position = resume.manifest.get("data_position")
        run_log = RunLog(max(steps - start, 0), c.global_batch_size, self.out_dir, self.log_every, self.progress)
        controller = Controller(group, c, run_log.record, committed_updates=updates, on_rewind=run_log.rewind,
                                position=position)
        try:
            controller.run(start, steps)
            controller.finish(max(steps, start))
        except RunFailed:
            run_log.close()
            raise
        infos = group.info()
        summary = run_log.close({
            "state_bytes_per_worker": infos[0]["state_bytes"], "state_bytes_unsharded": infos[0]["state_bytes_unsharded"],
            "num_params": infos[0]["num_params"], "num_workers": len(infos), "zero_stage": c.zero_stage,
            "nodes": len({i.get("node_id") for i in infos}), "failures": len(controller.failures)})
        return FitResult(group.state_dict(), controller.history, controller.failures, summary, controller.growths)


class _Cluster:
    """Ray for the length of one ``fit``: joined, started embedded, or skipped (``"local"``)."""

    def __init__(self, address: str | None, config: TrainConfig) -> None:
        self.address, self.config, self.started = address, config, False

    def __enter__(self) -> "_Cluster":
        if self.address == "local":
            return self
        import ray
        if ray.is_initialized():
            return self
        if self.address is None:
            c = self.config
            workers = c.num_workers + c.spare_workers
            ray.init(num_cpus=max(1, int(workers * c.num_cpus_per_worker + 0.999)),
                     num_gpus=workers if c.use_gpu else 0, include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_import_paths())}})
        else:
            ray.init(address=self.address, configure_logging=False)
        self.started = True
        return self

    def group(self) -> Any:
        if self.address == "local":
            from distopt.runtime.local import LocalWorkerGroup
            return LocalWorkerGroup(self.config)
        from distopt.runtime.group import RayWorkerGroup
        return RayWorkerGroup(self.config, loopback=self.address is None)

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import ray
            ray.shutdown()


def _import_paths() -> list[str]:
    # Workers must import the user's modules (model, loss, data) exactly as the driver does.
    import sys
    return [p for p in [os.getcwd(), *sys.path] if p and os.path.isdir(p)]
