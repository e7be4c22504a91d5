"""The step controller: run a step everywhere, commit it, or recover and redo it.

Commit, then step: step k enters the history only when every rank reported it. After a
failure the survivors return to the last commit, lost ranks are replaced (or the group
shrinks), the group is re-formed, and step k is redone on the same data, so the history
holds every step exactly once and the weights match a run without the failure. A worker
lost while the group re-forms is one more failure, and the recovery starts over from
the same commit (:mod:`distopt.runtime.failure_handling`).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from distopt.runtime import policy
from distopt.runtime.checkpointing import Coordinator
from distopt.runtime.config import TrainConfig
from distopt.runtime.errors import RunFailed
from distopt.runtime.evaluation import combine
from distopt.runtime.failure_handling import FailureHandling
from distopt.runtime.worker import StepReport

log = logging.getLogger("distopt")

__all__ = ["Controller", "RunFailed", "committed_position", "history_entry"]  # RunFailed: from errors


class Controller(FailureHandling):
    """Drives a worker group through ``steps``; ``on_commit(entry)`` sees each committed step."""

    def __init__(self, group: Any, config: TrainConfig, on_commit: Callable[[dict], None],
                 committed_updates: int = 0, on_rewind: Callable[[int], None] = lambda step: None,
                 events: Any = None, position: dict | None = None) -> None:
        self.group, self.config, self.on_commit, self.on_rewind = group, config, on_commit, on_rewind
        self.events = events  # ``fire(hook, record)``: on_eval, on_checkpoint, on_failure (callbacks.Callbacks)
        self.history: list[dict] = []
        self.failures: list[dict] = []
        self.growths: list[dict] = []  # one record per growth back after a shrink
        self.committed_updates = committed_updates
        self.position = position  # a stream's committed read position (None: map-style data, or step 0)
        self.world_size = config.num_workers
        self.episodes = 0  # recoveries and growths begun: a worker's offer is kept within one
        self.steps = 0  # the run's last step (for the evaluation at the end)
        self.committed_step = 0
        self.checkpoints = Coordinator(config.checkpoint_dir, config.keep_last, self._written) \
            if config.checkpoint_dir else None

    def _fire(self, hook: str, record: dict) -> None:
        if self.events is not None:
            self.events.fire(hook, record)

    def _written(self, step: int, path: str) -> None:
        self._fire("on_checkpoint", {"step": step, "path": path})

    def finish(self, steps: int) -> list[int]:
        """After the last step: wait for checkpoint writes, write the final one; steps checkpointed."""
        if self.checkpoints is None:
            return []
        self.checkpoints.add(self.group.flush_checkpoints())
        self.checkpoints.finish(steps)
        if steps not in self.checkpoints.written and not _exists(self.config.checkpoint_dir, steps):
            self.checkpoints.add(self.group.checkpoint(steps))
            self.checkpoints.finish(steps)
        return self.checkpoints.written

    def settle(self) -> None:
        """After the run was stopped from the driver: let background writes end and finish the
        checkpoints of committed steps, without calling the callbacks again."""
        self.events = None
        if self.checkpoints is not None:
            self.checkpoints.add(self.group.flush_checkpoints())
            self.checkpoints.finish(self.committed_step)

    def run(self, start: int, steps: int) -> None:
        """Run 0-based steps ``start .. steps-1``, recovering from failures on the way."""
        k, self.steps, self.committed_step = start, steps, start
        while k < steps:
            if self.world_size < self.config.num_workers and self.config.grow_back:
                k = self._maybe_grow(k)
            t0 = time.perf_counter()
            outcomes = self.group.run_step(k, self.position)
            statuses = [o.status for o in outcomes]
            decision = self._decide(statuses, can_replace=True)
            if decision.action == "continue":
                entry = self._commit(k, [o.report for o in outcomes], time.perf_counter() - t0)
                refill_spares = getattr(self.group, "refill_spares", None)
                if refill_spares is not None:  # a recovery used spares: their successors start now
                    refill_spares()
                k += 1
                resume = self._evaluate(k, entry) if self._eval_due(k) else k
                if resume == k:  # else the run went back to a checkpoint: the step is redone
                    self.history.append(entry)
                    self.on_commit(entry)
                    self._fire("on_step_end", entry)
                k = resume
                continue
            k = self._recover(k, outcomes, decision, detect_s=time.perf_counter() - t0)

    def _maybe_grow(self, k: int) -> int:
        """Grow back before 0-based step ``k`` if capacity returned; the step to run next."""
        # Between steps (step k has not started): every shard sits with its owner, so the
        # group grows by resharding from memory, like a recovery with nothing to undo.
        ready_to_grow = getattr(self.group, "ready_to_grow", None)
        if ready_to_grow is None:
            return k
        ready = ready_to_grow(self.config.num_workers)
        size = policy.grow_size(self.world_size, ready, self.config.global_batch_size,
                                self.config.gradient_accumulation_steps)
        if size is None:
            return k
        t0 = time.perf_counter()
        old_world = self.world_size
        self.episodes += 1
        outcomes = self.group.grow(self.committed_updates, size - old_world, self.episodes)
        if not all(o.status.ok for o in outcomes):  # a rank failed meanwhile: recover as after a step
            decision = self._decide([o.status for o in outcomes], can_replace=True)
            return self._recover(k, outcomes, decision, time.perf_counter() - t0,
                                 origin=list(range(old_world)) + [None] * (len(outcomes) - old_world),
                                 phase="grow back")
        self.world_size = len(outcomes)
        self.growths.append({"step": k + 1, "world_size": self.world_size, "restore_s": time.perf_counter() - t0})
        log.warning("before step %d: capacity is back, grew to %d workers in %.2fs", k + 1, self.world_size,
                    time.perf_counter() - t0)
        return k

    def _commit(self, k: int, reports: list[StepReport], wall: float) -> dict:
        """Commit 0-based step ``k``; its history entry, kept once any evaluation after it is in."""
        self.committed_updates, self.committed_step = reports[0].updates, k + 1
        self.position = committed_position(k, reports)
        if self.checkpoints is not None:
            self.checkpoints.add([r for rep in reports for r in rep.checkpoints])
            self.checkpoints.finish(k + 1)
        return history_entry(k + 1, reports, wall, self.config.global_batch_size)

    def _eval_due(self, done: int) -> bool:
        c = self.config
        return c.eval_data is not None and (done == self.steps or bool(c.eval_every and done % c.eval_every == 0))

    def _evaluate(self, done: int, entry: dict) -> int:
        """Evaluate the weights after ``done`` committed steps into ``entry``; the 0-based step
        to run next: ``done``, or an earlier one when a failure sent the run back to a checkpoint.

        A failure is recovered as one before step ``done + 1`` would be (the committed state
        is the same), then the evaluation runs again.
        """
        while True:
            t0 = time.perf_counter()
            outcomes = self.group.run_eval(done)
            decision = self._decide([o.status for o in outcomes], can_replace=True)
            if decision.action == "continue":
                record = combine(done, [o.report for o in outcomes], time.perf_counter() - t0)
                entry.update({k: v for k, v in record.items() if k != "step"})
                self._fire("on_eval", record)
                return done
            resume = self._recover(done, outcomes, decision, time.perf_counter() - t0, phase="evaluation")
            if resume != done:
                return resume

def committed_position(k: int, reports: list[StepReport]) -> dict | None:
    """The read position after step ``k``, which every rank computed alike.

    Raises:
        RuntimeError: the ranks disagree (the stream's order is not deterministic).
    """
    found = {repr(r.position) for r in reports}
    if len(found) > 1:
        raise RuntimeError(f"step {k + 1}: the ranks ended at different read positions {sorted(found)}: the "
                           f"stream does not yield the same samples on every worker (seed its shuffling)")
    return reports[0].position


def history_entry(step: int, reports: list[StepReport], wall: float, batch: int) -> dict:
    """One committed step as the history keeps it: means over ranks, slowest phase times."""
    n = len(reports)
    entry = {"step": step, "loss": sum(r.loss for r in reports) / n, "time_s": wall, "committed_at": time.time(),
             "world_size": n,
             "samples_per_s": batch / wall if wall > 0 else 0.0,
             "data_s": max(r.data_s for r in reports), "compute_s": max(r.compute_s for r in reports),
             "comm_s": max(r.comm_s for r in reports), "update_s": max(r.update_s for r in reports),
             "grad_norm": reports[0].grad_norm, "skipped": reports[0].skipped}
    for key in reports[0].metrics:
        entry[key] = sum(r.metrics.get(key, 0.0) for r in reports) / n
    return entry


def _exists(root: str, step: int) -> bool:
    from distopt.checkpoint import list_checkpoints, step_dir
    return step_dir(root, step) in list_checkpoints(root)
