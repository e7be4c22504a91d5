"""``distopt.Trainer``: the user's model trained data-parallel on Ray (or in-process).

The driver is the step controller: it sends step k to every worker, collects their
reports as data, and commits k when all are in. Ray is set up here and torn down after
``fit`` (also when it raises) when this Trainer started it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from distopt.data import kind_of, positions
from distopt.optim.rules import Rule
from distopt.runtime.callbacks import CallbackError
from distopt.runtime.loggers import resolve_callbacks
from distopt.runtime.config import TrainConfig
from distopt.runtime.groups import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, group_or_default
from distopt.runtime.checkpointing import load_for_resume
from distopt.runtime.compiled import CompiledFactory
from distopt.runtime.controller import Controller, RunFailed
from distopt.runtime.param_groups import check_resume
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
        optimizer: ``distopt.optim.adam(...)``, ``sgd(...)`` or ``muon(...)``: the groups' default rule.
        global_batch_size: samples per step over all workers and micro-batches.
        param_groups: a module-level function ``model -> groups`` (torch-style dicts with
            ``"params"`` and overrides: ``"lr"``, ``"weight_decay"``, ``"rule"``), e.g.
            ``distopt.optim.decay_groups`` or ``distopt.optim.muon_groups``. Every trainable
            parameter must be in one group. A group's number ``lr`` under a scheduled rule
            scales the schedule by ``lr / schedule.lr``. None: one group.
        zero_stage: 0 (replicated state), 1 (sharded state) or 2 (sharded state and gradients).
        seed: model initialisation and sampling seed.
        gradient_accumulation_steps: micro-batches per worker per step.
        max_grad_norm: clip the global gradient norm (None: off).
        mixed_precision: ``"bf16"`` runs forward and backward under bf16 autocast; weights,
            gradients and optimizer state stay fp32.
        eval_data: held-out map-style dataset, evaluated on the committed weights, sharded over
            the workers (None: no evaluation).
        eval_every: evaluate every N steps and at the end of ``fit`` (0: only at the end).
        eval_fn: ``(model, batch) -> loss`` or ``(loss, metrics)``, each a mean over the batch
            (None: the training ``loss``); run under ``torch.no_grad()`` with the model in eval mode.
        eval_batch_size: samples per evaluation batch (None: one worker's micro-batch). The
            batches do not depend on the world size, so any worker count gives the same bits.
        scaling: :class:`~distopt.runtime.groups.ScalingConfig`: workers, GPUs, placement, Ray address.
        failure: :class:`~distopt.runtime.groups.FailureConfig`: failures survived and how.
        checkpoint: :class:`~distopt.runtime.groups.CheckpointConfig`: folder, period, resume.
        run: :class:`~distopt.runtime.groups.RunConfig`: output folder, log lines, progress, callbacks.
        compile: ``torch.compile`` each worker's model (in place: parameter names and
            ``state_dict`` keys stay the model's own); the first step pays the compilation.
        num_data_workers: background loader processes per worker (0: batches are read on
            the training thread when the step needs them).
        prefetch: steps each loader process keeps ready (pinned memory on a GPU).

    Raises:
        TypeError, ValueError: bad arguments, before anything starts.
    """

    def __init__(self, model: Callable[[], Any], loss: Callable, data: Any, optimizer: Rule,
                 global_batch_size: int, param_groups: Callable[[Any], Any] | None = TrainConfig.param_groups,
                 zero_stage: int = TrainConfig.zero_stage, seed: int = TrainConfig.seed,
                 gradient_accumulation_steps: int = TrainConfig.gradient_accumulation_steps,
                 max_grad_norm: float | None = TrainConfig.max_grad_norm,
                 mixed_precision: str | None = TrainConfig.mixed_precision, eval_data: Any = TrainConfig.eval_data,
                 eval_every: int = TrainConfig.eval_every, eval_fn: Callable | None = TrainConfig.eval_fn,
                 eval_batch_size: int | None = TrainConfig.eval_batch_size,
                 num_data_workers: int = TrainConfig.num_data_workers, prefetch: int = TrainConfig.prefetch,
                 compile: bool = False,
                 scaling: ScalingConfig | None = None,
                 failure: FailureConfig | None = None, checkpoint: CheckpointConfig | None = None,
                 run: RunConfig | None = None) -> None:
        self.run = group_or_default("run", run)
        self.callbacks = resolve_callbacks(self.run.callbacks, self.run.out_dir)
        self.config = TrainConfig(
            model=model, loss=loss, data=data, optimizer=optimizer, global_batch_size=global_batch_size,
            param_groups=param_groups,
            zero_stage=zero_stage, seed=seed, gradient_accumulation_steps=gradient_accumulation_steps,
            max_grad_norm=max_grad_norm, mixed_precision=mixed_precision, eval_data=eval_data,
            eval_every=eval_every, eval_fn=eval_fn, eval_batch_size=eval_batch_size,
            num_data_workers=num_data_workers, prefetch=prefetch,
            scaling=group_or_default("scaling", scaling), failure=group_or_default("failure", failure),
            checkpoint=group_or_default("checkpoint", checkpoint))
        if not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r} must be True or False")
        if compile:  # compiled where each worker builds it; the factory stays picklable
            self.config = dataclasses.replace(self.config, model=CompiledFactory(self.config.model))

    def fit(self, steps: int) -> FitResult:
        """Train until the step count reaches ``steps``; returns weights, history, failures.

        Raises:
            ValueError: ``steps`` is not a positive int.
            WorkerError: user code raised in a worker (rank and traceback in the message).
            WorkerLost: a worker died (fault tolerance arrives in a later milestone).
            PlacementError: the cluster cannot hold the workers.
            CallbackError: a callback raised; the run stopped after the step it was called for.
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps={steps!r} must be a positive int")
        resume_from = self.config.checkpoint.resume_from
        resume = load_for_resume(resume_from) if resume_from else None  # a bad checkpoint fails here
        if resume is not None:
            c = self.config
            check_resume(resume.manifest.get("param_groups"), c.param_groups, c.model, c.optimizer)
            # a stream resumed from a map-style run's checkpoint (or back) fails here too
            positions.for_resume(kind_of(c.data), resume.manifest.get("data_position"),
                                 resume.manifest["next_step"], f"checkpoint {resume_from}")
        with _Cluster(self.config.scaling.ray_address, self.config) as cluster:
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
        r = self.run
        run_log = RunLog(max(steps - start, 0), c.global_batch_size, r.out_dir, r.log_every, r.progress)
        controller = Controller(group, c, run_log.record, committed_updates=updates, on_rewind=run_log.rewind,
                                events=self.callbacks, position=position)
        try:
            controller.run(start, steps)
            controller.finish(max(steps, start))
        except CallbackError:
            controller.settle()  # writes of committed steps finish; nothing half-written is listed
            run_log.close()
            raise
        except RunFailed:
            run_log.close()
            raise
        infos = group.info()
        evals = [h for h in controller.history if "eval_loss" in h]
        summary = run_log.close({
            "state_bytes_per_worker": infos[0]["state_bytes"], "state_bytes_unsharded": infos[0]["state_bytes_unsharded"],
            "num_params": infos[0]["num_params"], "num_workers": len(infos), "zero_stage": c.zero_stage,
            "nodes": len({i.get("node_id") for i in infos}), "failures": len(controller.failures),
            **({"eval_loss": evals[-1]["eval_loss"]} if evals else {})})
        result = FitResult(group.state_dict(), controller.history, controller.failures, summary, controller.growths)
        self.callbacks.fire("on_fit_end", result)
        return result


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
            start_embedded_ray(max(1, int(workers * c.num_cpus_per_worker + 0.999)), workers if c.use_gpu else 0)
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


def start_embedded_ray(num_cpus: int, num_gpus: int = 0, log_to_driver: bool = True) -> None:
    """Start the Ray cluster a Trainer without ``ray_address`` runs on: this machine only,
    loopback, no dashboard, and workers that import the driver's modules."""
    import ray
    # address="local": a cluster of its own even where another one (`ray start`, another
    # job's) already runs on this machine, which a plain init would join.
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=log_to_driver, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_import_paths())}})


def _import_paths() -> list[str]:
    # Workers must import the user's modules (model, loss, data) exactly as the driver does.
    import sys
    return [p for p in [os.getcwd(), *sys.path] if p and os.path.isdir(p)]
