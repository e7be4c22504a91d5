"""Everything a run needs, checked on the driver before any worker starts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from distopt.data import kind_of
from distopt.ft.replica_log import DEPTH as REPLICA_LOG_DEPTH, check_depth
from distopt.optim.plan import shard_count
from distopt.optim.rules import Rule, check_rule

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class TrainConfig:
    """A validated run description, shipped to every worker."""

    model: Callable[[], Any]
    loss: Callable[[Any, Any], Any]
    data: Any
    optimizer: Rule
    global_batch_size: int
    num_workers: int = 2
    use_gpu: bool = False
    zero_stage: int = 1
    seed: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    bucket_bytes: int = 25 * 2**20
    last_bucket_bytes: int = 2**20  # the last layers' bucket, reduced first (DDP's first bucket)
    overlap: bool = True  # reduce gradient buckets during backward
    grad_wire_dtype: Any = None  # torch.bfloat16 / torch.float16: gradients narrowed on the wire
    mixed_precision: str | None = None  # "bf16": forward/backward under autocast, fp32 master weights
    num_cpus_per_worker: float = 1
    placement_strategy: str = "PACK"
    collective_timeout_s: float = 60.0
    placement_timeout_s: float = 30.0
    max_failures: int = 3  # 0 turns fault tolerance (and its in-memory redundancy) off
    min_workers: int = 1
    replace_timeout_s: float = 30.0
    spare_workers: int = 0  # idle workers with the model built, ready to take a lost rank
    step_timeout_s: float = 300.0
    grow_back: bool = True  # after a shrink, take ranks back when their bundles can be placed again
    shared_memory: bool = True  # ranks on one host keep the redundancy in /dev/shm instead of sending it
    replica_log_depth: int = REPLICA_LOG_DEPTH  # on one host: logged gradient steps (memory) vs copy per step
    faults: tuple = ()  # distopt.runtime.faults.Fault records, for chaos tests
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end of fit
    keep_last: int = 3
    num_data_workers: int = 0  # background loader processes per worker (0: load on the training thread)
    prefetch: int = 2  # steps each loader process keeps ready

    @property
    def fault_tolerant(self) -> bool:
        """Whether workers keep the redundancy that lets a failed step be undone."""
        return self.max_failures > 0

    def __post_init__(self) -> None:
        _check_callables(self)
        _check_counts(self)
        _check_batch(self)

    @property
    def per_rank_batch(self) -> int:
        """Samples each rank takes per step (all micro-batches together)."""
        return self.global_batch_size // self.num_workers

    @property
    def backend(self) -> str:
        """The collective backend: NCCL for GPU workers, gloo otherwise."""
        return "nccl" if self.use_gpu else "gloo"


def _check_callables(c: TrainConfig) -> None:
    if not callable(c.model) or isinstance(c.model, torch.nn.Module):
        raise TypeError(f"model must be a zero-arg callable returning an nn.Module, got {type(c.model).__name__}: "
                        f"pass the class or a factory (model=MyNet), not an instance")
    if not callable(c.loss):
        raise TypeError("loss must be a callable (model, batch) -> scalar tensor or (loss, metrics)")
    kind_of(c.data)  # a map-style dataset, a stream, shards, Ray Data or a module-level factory
    check_rule(c.optimizer)


def _check_counts(c: TrainConfig) -> None:
    for name in ("global_batch_size", "num_workers", "gradient_accumulation_steps", "bucket_bytes"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    shard_count(c.num_workers, c.zero_stage)
    if not isinstance(c.seed, int):
        raise ValueError(f"seed={c.seed!r} must be an int")
    if c.max_grad_norm is not None and not c.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={c.max_grad_norm!r} must be > 0, or None for no clipping")
    if c.grad_wire_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"grad_wire_dtype={c.grad_wire_dtype!r} must be None, torch.bfloat16 or torch.float16")
    if c.mixed_precision not in (None, "bf16"):
        raise ValueError(f"mixed_precision={c.mixed_precision!r} must be None or 'bf16'")
    if c.placement_strategy not in STRATEGIES:
        raise ValueError(f"placement_strategy={c.placement_strategy!r} must be one of {STRATEGIES}")
    if not c.num_cpus_per_worker > 0:
        raise ValueError(f"num_cpus_per_worker={c.num_cpus_per_worker!r} must be > 0")
    if not isinstance(c.max_failures, int) or c.max_failures < 0:
        raise ValueError(f"max_failures={c.max_failures!r} must be an int >= 0 (0: no fault tolerance)")
    if not isinstance(c.shared_memory, bool):
        raise ValueError(f"shared_memory={c.shared_memory!r} must be True or False")
    check_depth(c.replica_log_depth)
    if not isinstance(c.spare_workers, int) or c.spare_workers < 0:
        raise ValueError(f"spare_workers={c.spare_workers!r} must be an int >= 0")
    if c.spare_workers and not c.fault_tolerant:
        raise ValueError("spare_workers needs fault tolerance: set max_failures >= 1")
    if not isinstance(c.checkpoint_every, int) or c.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={c.checkpoint_every!r} must be an int >= 0 (0: only at the end)")
    if not isinstance(c.keep_last, int) or c.keep_last < 1:
        raise ValueError(f"keep_last={c.keep_last!r} must be an int >= 1")
    if not isinstance(c.min_workers, int) or not 1 <= c.min_workers <= c.num_workers:
        raise ValueError(f"min_workers={c.min_workers!r} must be an int in [1, num_workers={c.num_workers}]")
    if not isinstance(c.num_data_workers, int) or isinstance(c.num_data_workers, bool) or c.num_data_workers < 0:
        raise ValueError(f"num_data_workers={c.num_data_workers!r} must be an int >= 0 (0: load on the training "
                         f"thread)")
    if not isinstance(c.prefetch, int) or isinstance(c.prefetch, bool) or c.prefetch < 1:
        raise ValueError(f"prefetch={c.prefetch!r} must be an int >= 1 (steps each loader process keeps ready)")
    for name in ("collective_timeout_s", "placement_timeout_s", "replace_timeout_s", "step_timeout_s"):
        if not getattr(c, name) > 0:
            raise ValueError(f"{name}={getattr(c, name)!r} must be > 0 seconds")


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
