"""Everything a run needs, checked on the driver before any worker starts.

:class:`TrainConfig` holds the Trainer's own arguments and its Scaling, Failure and
Checkpoint groups (:mod:`distopt.runtime.groups`, where every default of theirs is
written); it is shipped to every worker. The groups' fields read through it under the
names the runtime uses (``config.num_workers`` is ``config.scaling.num_workers``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from distopt.data import kind_of
from distopt.optim.plan import shard_count
from distopt.optim.rules import Rule, check_rule
from distopt.runtime.param_groups import check_on_meta
from distopt.runtime.groups import CheckpointConfig, FailureConfig, ScalingConfig


class _In:
    """A read-only view of a group's field, e.g. ``num_workers = _In("scaling")``."""

    def __init__(self, group: str, name: str | None = None) -> None:
        self.group, self.name = group, name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.group), self.name)


@dataclass(frozen=True)
class TrainConfig:
    """A validated run description, shipped to every worker."""

    model: Callable[[], Any]
    loss: Callable[[Any, Any], Any]
    data: Any
    optimizer: Rule
    global_batch_size: int
    param_groups: Callable[[Any], Any] | None = None  # model -> torch-style groups
    zero_stage: int = 1
    seed: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str | None = None  # "bf16": forward/backward under autocast, fp32 master weights
    eval_data: Any = None  # map-style dataset evaluated on the committed weights
    eval_every: int = 0  # steps between evaluations; 0: only at the end of fit (with eval_data)
    eval_fn: Callable | None = None  # (model, batch) -> loss or (loss, metrics); None: the training loss
    eval_batch_size: int | None = None  # samples per evaluation batch; None: one worker's micro-batch
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    last_bucket_bytes: int = 2**20  # the last layers' bucket, reduced first (DDP's first bucket)
    overlap: bool = True  # reduce gradient buckets during backward
    num_data_workers: int = 0  # background loader processes per worker (0: load on the training thread)
    prefetch: int = 2  # steps each loader process keeps ready

    num_workers = _In("scaling")
    use_gpu = _In("scaling")
    num_cpus_per_worker = _In("scaling", "cpus_per_worker")
    placement_strategy = _In("scaling")
    placement_timeout_s = _In("scaling")
    bucket_bytes = _In("scaling")
    grad_wire_dtype = _In("scaling")
    max_failures = _In("failure")
    min_workers = _In("failure")
    replace_timeout_s = _In("failure")
    spare_workers = _In("failure")
    step_timeout_s = _In("failure")
    collective_timeout_s = _In("failure")
    grow_back = _In("failure")
    shared_memory = _In("failure")
    replica_log_depth = _In("failure")
    faults = _In("failure")
    checkpoint_dir = _In("checkpoint", "dir")
    checkpoint_every = _In("checkpoint", "every")
    keep_last = _In("checkpoint")

    @property
    def fault_tolerant(self) -> bool:
        """Whether workers keep the redundancy that lets a failed step be undone."""
        return self.max_failures > 0

    def __post_init__(self) -> None:
        for name, cls in (("scaling", ScalingConfig), ("failure", FailureConfig), ("checkpoint", CheckpointConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a distopt.{cls.__name__}, got {type(getattr(self, name)).__name__}: "
                                f"write {name}=distopt.{cls.__name__}(...)")
        _check_callables(self)
        _check_counts(self)
        _check_batch(self)
        _check_eval(self)

    @property
    def per_rank_batch(self) -> int:
        """Samples each rank takes per step (all micro-batches together)."""
        return self.global_batch_size // self.num_workers

    @property
    def eval_chunk(self) -> int:
        """Samples per evaluation batch: fixed for the run, whatever the world size becomes."""
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return self.global_batch_size // (self.num_workers * self.gradient_accumulation_steps)

    @property
    def backend(self) -> str:
        """The collective backend: NCCL for GPU workers, gloo otherwise."""
        return "nccl" if self.use_gpu else "gloo"


def _is_map_style(data: Any) -> bool:
    return hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _check_callables(c: TrainConfig) -> None:
    if not callable(c.model) or isinstance(c.model, torch.nn.Module):
        raise TypeError(f"model must be a zero-arg callable returning an nn.Module, got {type(c.model).__name__}: "
                        f"pass the class or a factory (model=MyNet), not an instance")
    if not callable(c.loss):
        raise TypeError("loss must be a callable (model, batch) -> scalar tensor or (loss, metrics)")
    kind_of(c.data)  # a map-style dataset, a stream, shards, Ray Data or a module-level factory
    check_rule(c.optimizer)
    if c.param_groups is not None:
        if not callable(c.param_groups):
            raise TypeError(f"param_groups={c.param_groups!r} must be a module-level function model -> groups, e.g. "
                            f"distopt.optim.decay_groups")
        check_on_meta(c.param_groups, c.model, c.optimizer)


def _check_counts(c: TrainConfig) -> None:
    for name in ("global_batch_size", "gradient_accumulation_steps"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    shard_count(c.num_workers, c.zero_stage)
    if not isinstance(c.seed, int):
        raise ValueError(f"seed={c.seed!r} must be an int")
    if c.max_grad_norm is not None and not c.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={c.max_grad_norm!r} must be > 0, or None for no clipping")
    if c.mixed_precision not in (None, "bf16"):
        raise ValueError(f"mixed_precision={c.mixed_precision!r} must be None or 'bf16'")
    if c.min_workers > c.num_workers:
        raise ValueError(f"FailureConfig.min_workers={c.min_workers} is more than ScalingConfig.num_workers="
                         f"{c.num_workers}: use a min_workers in [1, {c.num_workers}]")

    if not isinstance(c.num_data_workers, int) or isinstance(c.num_data_workers, bool) or c.num_data_workers < 0:
        raise ValueError(f"num_data_workers={c.num_data_workers!r} must be an int >= 0 (0: load on the training "
                         f"thread)")
    if not isinstance(c.prefetch, int) or isinstance(c.prefetch, bool) or c.prefetch < 1:
        raise ValueError(f"prefetch={c.prefetch!r} must be an int >= 1 (steps each loader process keeps ready)")

def _check_eval(c: TrainConfig) -> None:
    if not isinstance(c.eval_every, int) or isinstance(c.eval_every, bool) or c.eval_every < 0:
        raise ValueError(f"eval_every={c.eval_every!r} must be an int >= 0 (0: evaluate only at the end)")
    if c.eval_data is None:
        if c.eval_every or c.eval_fn is not None or c.eval_batch_size is not None:
            raise ValueError("eval_every, eval_fn and eval_batch_size need eval_data=: pass the held-out "
                             "map-style dataset to evaluate on")
        return
    if not _is_map_style(c.eval_data) or len(c.eval_data) == 0:
        raise TypeError(f"eval_data must be a non-empty map-style dataset (__len__ and __getitem__), "
                        f"got {type(c.eval_data).__name__}")
    if c.eval_fn is not None and not callable(c.eval_fn):
        raise TypeError(f"eval_fn must be a callable (model, batch) -> loss or (loss, metrics), "
                        f"got {type(c.eval_fn).__name__}")
    if c.eval_batch_size is not None and (not isinstance(c.eval_batch_size, int) or c.eval_batch_size < 1):
        raise ValueError(f"eval_batch_size={c.eval_batch_size!r} must be a positive int, or None")


def _check_batch(c: TrainConfig) -> None:
    split = c.num_workers * c.gradient_accumulation_steps
    if c.global_batch_size % split:
        lower = c.global_batch_size // split * split
        hint = f"{lower} or {lower + split}" if lower else f"{split}"
        raise ValueError(
            f"global_batch_size={c.global_batch_size} is not divisible by num_workers * gradient_accumulation_steps"
            f" = {c.num_workers} * {c.gradient_accumulation_steps} = {split}: use a multiple of {split} (e.g. {hint})")
    if kind_of(c.data) != "map":
        return  # streams and factories are checked where they are read, on the workers
    n = len(c.data)
    if n < c.global_batch_size:
        raise ValueError(f"dataset has {n} samples, fewer than one global batch of {c.global_batch_size}: "
                         f"lower global_batch_size or add data")
