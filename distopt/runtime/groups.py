"""The Trainer's settings in the four groups Ray Train users know.

``ScalingConfig`` (where workers run and how they exchange gradients), ``FailureConfig``
(what the run survives and how), ``CheckpointConfig`` (what goes to disk) and
``RunConfig`` (what the driver shows and logs). Each default is written here once; the
Trainer, the CLI and the TOML files take them from these classes. Every group checks its
own fields on construction, naming the field and the fix, so a bad group fails before
Ray starts. ``to_dict``/``from_dict`` map a group onto a TOML table and back.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from distopt.ft.replica_log import DEPTH as REPLICA_LOG_DEPTH, check_depth

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
WIRE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
BUILT_IN_CALLBACKS = ("tensorboard", "mlflow")
_NOT_IN_TOML = {"toml": False}


class _Group:
    """What every group shares: its error format and its TOML table."""

    def _check(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} {rule}")

    def to_dict(self) -> dict:
        """The group as a TOML table: fields left at None are omitted (None is their default)."""
        out = {}
        for f in toml_fields(type(self)):
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = next(k for k, v in WIRE_DTYPES.items() if v == value)
            if isinstance(value, tuple):
                value = list(value)
            if value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], where: str = ""):
        """Build the group from a TOML table; an unknown key raises ValueError naming it.

        Args:
            table: field name -> value.
            where: prefix for error messages (e.g. the file and table).
        """
        names = [f.name for f in toml_fields(cls)]
        for key in table:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{where}unknown key {key!r} for {cls.__name__}{hint}: its keys are {', '.join(names)}")
        return cls(**table)


def toml_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a group that a TOML file (and the CLI) can set."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("toml", True)]


def _int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


@dataclass(frozen=True)
class ScalingConfig(_Group):
    """Where the workers run and how they exchange gradients.

    Attributes:
        num_workers: data-parallel ranks (Ray actors).
        use_gpu: one GPU per worker, CUDA tensors and NCCL.
        cpus_per_worker: CPUs Ray reserves for each worker (its torch threads).
        placement_strategy: Ray placement of the workers' bundles: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD.
        ray_address: None starts a Ray cluster for the run; 'auto' or 'ray://host:port' joins one;
            'local' runs the workers as threads in this process, without Ray.
        placement_timeout_s: seconds to wait for the cluster to place the workers.
        bucket_bytes: cap on one gradient bucket (one collective each, overlapped with backward).
        grad_wire_dtype: 'bfloat16' or 'float16' sends gradients narrowed (summed in fp32); None sends fp32.
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    ray_address: str | None = None
    placement_timeout_s: float = 30.0
    bucket_bytes: int = 25 * 2**20
    grad_wire_dtype: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.grad_wire_dtype, str) and self.grad_wire_dtype in WIRE_DTYPES:
            object.__setattr__(self, "grad_wire_dtype", WIRE_DTYPES[self.grad_wire_dtype])
        self._check("num_workers", _int(self.num_workers, 1), "must be an int >= 1")
        self._check("use_gpu", isinstance(self.use_gpu, bool), "must be True or False")
        self._check("cpus_per_worker", _positive(self.cpus_per_worker), "must be a number > 0")
        self._check("placement_strategy", self.placement_strategy in STRATEGIES, f"must be one of {STRATEGIES}")
        self._check("ray_address", _optional_str(self.ray_address),
                    "must be None, 'auto', 'local' or an address string such as 'ray://host:10001'")
        self._check("placement_timeout_s", _positive(self.placement_timeout_s), "must be > 0 seconds")
        self._check("bucket_bytes", _int(self.bucket_bytes, 1), "must be an int >= 1")
        self._check("grad_wire_dtype", self.grad_wire_dtype in (None, *WIRE_DTYPES.values()),
                    "must be None, 'bfloat16' or 'float16' (or torch.bfloat16, torch.float16)")


@dataclass(frozen=True)
class FailureConfig(_Group):
    """What the run survives, and how it recovers.

    Attributes:
        max_failures: worker failures survived before the run gives up; 0 turns fault tolerance
            (and its in-memory redundancy) off.
        spare_workers: idle workers kept with the model built, each ready to take a lost rank at once.
        min_workers: fewest workers a shrink may leave when no replacement can be placed.
        replace_timeout_s: seconds to wait for a replacement worker before shrinking.
        step_timeout_s: a step that takes longer counts its silent workers as hung.
        collective_timeout_s: seconds a collective may block before the step fails.
        grow_back: after a shrink, grow back towards num_workers when the resources return.
        shared_memory: workers on one host keep each replica in /dev/shm, where both the worker
            and its replica's holder reach it, instead of sending gradients (distopt.ft.shared_replica).
        replica_log_depth: between hosts on CPU, gradient steps each worker logs to undo its own
            update: higher copies less per step and takes more memory (distopt.ft.replica_log).
        faults: distopt.runtime.faults.Fault records that kill or stop workers on purpose (chaos tests).
    """

    max_failures: int = 3
    spare_workers: int = 0
    min_workers: int = 1
    replace_timeout_s: float = 30.0
    step_timeout_s: float = 300.0
    collective_timeout_s: float = 60.0
    grow_back: bool = True
    shared_memory: bool = True
    replica_log_depth: int = REPLICA_LOG_DEPTH
    faults: tuple = field(default=(), metadata=_NOT_IN_TOML)

    def __post_init__(self) -> None:
        object.__setattr__(self, "faults", tuple(self.faults))
        self._check("max_failures", _int(self.max_failures, 0), "must be an int >= 0 (0: no fault tolerance)")
        self._check("spare_workers", _int(self.spare_workers, 0), "must be an int >= 0")
        self._check("spare_workers", not (self.spare_workers and not self.max_failures),
                    "needs fault tolerance: set max_failures >= 1")
        self._check("min_workers", _int(self.min_workers, 1), "must be an int >= 1")
        for name in ("replace_timeout_s", "step_timeout_s", "collective_timeout_s"):
            self._check(name, _positive(getattr(self, name)), "must be > 0 seconds")
        self._check("grow_back", isinstance(self.grow_back, bool), "must be True or False")
        self._check("shared_memory", isinstance(self.shared_memory, bool), "must be True or False")
        try:
            check_depth(self.replica_log_depth)
        except ValueError as e:
            raise ValueError(f"FailureConfig.{e}") from None


@dataclass(frozen=True)
class CheckpointConfig(_Group):
    """What goes to disk (msgpack manifests and raw tensor bytes; see distopt.checkpoint).

    Attributes:
        dir: folder for checkpoints (step-N subfolders), shared by all nodes; None writes none.
        every: also checkpoint every N steps, in the background; 0 writes one only at the end of fit.
        keep_last: complete checkpoints kept; older ones are removed.
        resume_from: a checkpoint folder, or a checkpoint root (the newest that verifies); any
            num_workers and zero_stage may resume it.
    """

    dir: str | None = None
    every: int = 0
    keep_last: int = 3
    resume_from: str | None = None

    def __post_init__(self) -> None:
        for name in ("dir", "resume_from"):
            value = getattr(self, name)
            if value is not None and hasattr(value, "__fspath__"):
                object.__setattr__(self, name, str(value))
            self._check(name, _optional_str(getattr(self, name)), "must be a path or None")
        self._check("every", _int(self.every, 0), "must be an int >= 0 (0: only at the end)")
        self._check("every", not (self.every and self.dir is None), "needs a dir to write to: set CheckpointConfig.dir")
        self._check("keep_last", _int(self.keep_last, 1), "must be an int >= 1")


@dataclass(frozen=True)
class RunConfig(_Group):
    """What the driver shows and keeps of a run.

    Attributes:
        out_dir: folder for metrics.jsonl, summary.json and the plots; None writes no files.
        log_every: plain log line every N steps when there is no progress bar; 0 is silent.
        progress: progress bar on or off; None shows it only when stderr is a terminal.
        callbacks: objects with on_step_end/on_eval/on_checkpoint/on_failure/on_fit_end, called on
            the driver, or the names 'tensorboard', 'mlflow' or 'pkg.module:attribute'.
    """

    out_dir: str | None = None
    log_every: int = 10
    progress: bool | None = None
    callbacks: tuple = ()

    def __post_init__(self) -> None:
        if self.out_dir is not None and hasattr(self.out_dir, "__fspath__"):
            object.__setattr__(self, "out_dir", str(self.out_dir))
        if isinstance(self.callbacks, (list, tuple)):
            object.__setattr__(self, "callbacks", tuple(self.callbacks))
        self._check("out_dir", _optional_str(self.out_dir), "must be a path or None")
        self._check("log_every", _int(self.log_every, 0), "must be an int >= 0 (0: no log lines)")
        self._check("progress", self.progress in (None, True, False), "must be True, False or None")
        self._check("callbacks", isinstance(self.callbacks, tuple), "must be a list of callbacks")
        for i, cb in enumerate(self.callbacks):
            if isinstance(cb, str) and cb not in BUILT_IN_CALLBACKS and ":" not in cb:
                raise ValueError(f"RunConfig.callbacks[{i}]={cb!r} must be one of {BUILT_IN_CALLBACKS} or "
                                 f"'pkg.module:attribute'")

    def to_dict(self) -> dict:
        """The group as a TOML table; callbacks must be names (objects have no TOML form)."""
        objects = [cb for cb in self.callbacks if not isinstance(cb, str)]
        if objects:
            raise ValueError(f"RunConfig.callbacks holds {type(objects[0]).__name__} objects, which TOML cannot "
                             f"hold: name them as 'pkg.module:attribute' to write the config to TOML")
        return super().to_dict()


GROUPS = {"scaling": ScalingConfig, "failure": FailureConfig, "checkpoint": CheckpointConfig, "run": RunConfig}


def group_or_default(name: str, value: Any) -> Any:
    """``value`` if it is the group ``name`` takes, its defaults if None; TypeError otherwise."""
    cls = GROUPS[name]
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a distopt.{cls.__name__}, got {type(value).__name__}: "
                        f"write {name}=distopt.{cls.__name__}(...)")
    return value
