"""The same workers without Ray: one thread per rank over an in-process gloo group.

Used by tests and benchmarks to run the runtime's exact step code with no scheduler. With
``use_gpu`` rank ``r`` takes CUDA device ``r`` modulo the devices this process sees, so
several ranks may share one GPU; gloo then moves their CUDA tensors through host memory.
"""
from __future__ import annotations

import threading

from distopt.collectives.in_process import RankFailure, in_process, run_ranks
from distopt.runtime.config import TrainConfig
from distopt.runtime.errors import WorkerError
from distopt.runtime.policy import Outcome, WorkerStatus
from distopt.runtime.worker import Worker, device_for

_build_lock = threading.Lock()  # torch.manual_seed is process-global: build models one at a time


class LocalWorkerGroup:
    """``num_workers`` Workers in this process, driven like the Ray group."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.workers = [self._build(config, r) for r in range(config.num_workers)]
        comms = in_process(config.num_workers, timeout_s=config.collective_timeout_s)
        self._call("setup", lambda wc: wc[0].attach(wc[1]), list(zip(self.workers, comms)))

    @staticmethod
    def _build(config: TrainConfig, rank: int) -> Worker:
        with _build_lock:
            try:
                return Worker(config, rank, device=device_for(config.use_gpu, rank))
            except Exception as e:
                raise WorkerError(rank, "setup", f"{type(e).__name__}: {e}", e) from e

    def run_step(self, step: int, position: dict | None = None) -> list[Outcome]:
        """Run 0-based ``step`` from read ``position`` on every rank; any failure raises
        (threads cannot be replaced)."""
        reports = self._call(f"step {step}", lambda w: w.run_step(step, position), self.workers)
        return [Outcome(WorkerStatus(r.rank), r) for r in reports]

    def run_eval(self, step: int) -> list[Outcome]:
        """Evaluate on every rank after ``step`` committed steps; any failure raises."""
        reports = self._call(f"evaluation after step {step}", lambda w: w.evaluate(step), self.workers)
        return [Outcome(WorkerStatus(r.rank), r) for r in reports]

    def checkpoint(self, steps_done: int) -> list[dict]:
        """Every rank writes its part now and waits; their file records."""
        return [r for rs in self._call("checkpoint", lambda w: w.checkpoint(steps_done, wait=True), self.workers)
                for r in rs]

    def flush_checkpoints(self) -> list[dict]:
        """Wait for background checkpoint writes; their file records."""
        return [r for w in self.workers for r in w.flush_checkpoints()]

    def load(self, model_state: dict, full_state: dict) -> None:
        """Every rank takes weights and optimizer state from a checkpoint."""
        self._call("resume", lambda w: w.load(model_state, full_state), self.workers)

    def state_dict(self) -> dict:
        """Rank 0's model weights on CPU."""
        return self.workers[0].state_dict()

    def info(self) -> list[dict]:
        """Every rank's :meth:`Worker.info`."""
        return [w.info() for w in self.workers]

    def close(self) -> None:
        """Release every rank's group."""
        for w in self.workers:
            w.close()

    @staticmethod
    def _call(phase: str, fn, per_rank: list) -> list:
        try:
            return run_ranks(per_rank, fn)
        except RankFailure as e:
            cause = e.__cause__
            raise WorkerError(e.rank, phase, f"{type(cause).__name__}: {cause}", cause) from cause
