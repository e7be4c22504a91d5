"""The step controller: run a step everywhere, commit it, or recover and redo it.

Commit, then step: step k enters the history only when every rank reported it. After a
failure the survivors return to the last commit, lost ranks are replaced (or the group
shrinks), the group is re-formed, and step k is redone on the same data, so the history
holds every step exactly once and the weights match a run without the failure. A worker
lost while the group re-forms is one more failure, and the recovery starts over from
the same commit.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from distopt.ft.recovery import RecoveryError, holders
from distopt.optim.plan import shard_count
from distopt.runtime import policy
from distopt.runtime.checkpointing import Coordinator
from distopt.runtime.config import TrainConfig
from distopt.runtime.errors import TrainingError, WorkerLost
from distopt.runtime.evaluation import combine
from distopt.runtime.policy import Outcome, WorkerStatus
from distopt.runtime.worker import StepReport

log = logging.getLogger("distopt")

_PHASE_OF_OP = {"reduce_scatter": "grad_collective", "allreduce": "grad_collective", "shift": "shard_update",
                "allgather": "param_gather", "broadcast": "recovery"}


class RunFailed(TrainingError):
    """The run gave up: past ``max_failures``, or no way to go on. ``failures`` has every record."""

    def __init__(self, message: str, failures: list[dict]) -> None:
        super().__init__(message)
        self.failures = failures


class Controller:
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

    def _decide(self, statuses, can_replace: bool) -> policy.Decision:
        c = self.config
        return policy.decide(statuses, len(self.failures), c.max_failures, c.min_workers, c.global_batch_size,
                             c.gradient_accumulation_steps, can_replace)

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

    def _recover(self, k: int, outcomes, decision: policy.Decision, detect_s: float,
                 origin: list[int | None] | None = None, phase: str | None = None) -> int:
        """Recover from a failed step ``k``; returns the 0-based step to run next.

        A rank lost during the recovery itself is one more failure: the policy decides
        again and the recovery starts over from the same commit, each survivor offering
        what it held then. ``origin`` gives each current rank's rank at the last commit
        (None: it holds nothing of it); by default the ranks are those of the commit.
        """
        origin = list(range(len(outcomes))) if origin is None else list(origin)
        old_world = sum(o is not None for o in origin)
        shards = shard_count(old_world, self.config.zero_stage)
        distance = getattr(self.group, "replica_distance", 1)  # the commit's group: a failed attempt keeps it
        if phase != "grow back":  # a failed growth recovers within the growth's episode
            self.episodes += 1
        nodes = self._nodes()  # of the ranks ``outcomes`` names, before a replacement or regroup moves them
        while True:
            t1 = time.perf_counter()
            decision, order = self._replace_or_shrink(k, outcomes, decision, phase)
            t2 = time.perf_counter()
            origin = [None if r in decision.lost else origin[r] for r in order]  # a replacement holds nothing
            alive = {o: n for n, o in enumerate(origin) if o is not None}
            try:
                holder_of = holders(shards, alive, shards > 1, distance)
            except RecoveryError as lost:
                return self._from_checkpoint(k, outcomes, nodes, decision, order, lost, detect_s, t2 - t1, phase)
            regrouped = self.group.regroup(self.committed_updates, order, holder_of, old_world,
                                           keep=decision.world_size, episode=self.episodes)
            t3 = time.perf_counter()
            self._record(k, outcomes, nodes, decision, detect_s, t2 - t1, t3 - t2, phase)
            if all(o.status.ok for o in regrouped):
                break
            outcomes, nodes, phase, detect_s = regrouped, self._nodes(), "recovery", t3 - t2
            decision = self._decide([o.status for o in outcomes], can_replace=True)
            log.warning("step %d: a rank failed while the group was re-formed; recovering again", k + 1)
        self.world_size = decision.world_size
        if self.checkpoints is not None:
            self.checkpoints.forget_after(k)
        return k

    def _replace_or_shrink(self, k: int, outcomes, decision: policy.Decision,
                           phase: str | None) -> tuple[policy.Decision, list[int]]:
        """Carry out ``decision``'s replacements (shrinking when none can be placed); returns
        the decision taken and the current ranks that go on, in their new order."""
        if decision.action == "fail" or not self.config.fault_tolerant:
            self._give_up(k, outcomes, decision, phase)
        if decision.action == "replace" and not self.group.replace(decision.lost, k):
            decision = self._decide([o.status for o in outcomes], can_replace=False)
            if decision.action == "fail":
                self._give_up(k, outcomes, decision, phase)
        if decision.action == "replace" or decision.action == "retry":
            return decision, list(range(len(outcomes)))
        return decision, [r for r in range(len(outcomes)) if r not in decision.lost]

    def _from_checkpoint(self, k: int, outcomes, nodes: list, decision: policy.Decision, order: list[int],
                         lost: RecoveryError, detect_s: float, replace_s: float, phase: str | None = None) -> int:
        # A shard and its replica died together: memory cannot rebuild the last commit, the
        # newest checkpoint can. Its steps are redone on the same data: the same weights.
        t0 = time.perf_counter()
        good = self._newest_checkpoint(k)
        if good is None:
            self._record(k, outcomes, nodes, decision, detect_s, replace_s, 0.0, phase)
            raise RunFailed(f"step {k + 1}: {lost}; no checkpoint to fall back on (pass checkpoint="
                            f"distopt.CheckpointConfig(dir=..., every=...) to survive this)", self.failures)
        start = good.manifest["next_step"]

        def restarting(d: policy.Decision) -> policy.Decision:
            return d._replace(action=f"{d.action}, restart from checkpoint step {start}")
        while True:  # a rank lost on the way is one more failure, as in a recovery from memory
            rejoined = self.group.rejoin(order, keep=decision.world_size)
            if all(o.status.ok for o in rejoined):
                try:
                    self.group.load(good.model_state, good.optimizer_state)
                    break
                except WorkerLost as e:
                    rejoined = [Outcome(WorkerStatus(r, ok=False, dead=r == e.rank)) for r in range(len(rejoined))]
            self._record(k, outcomes, nodes, restarting(decision), detect_s, replace_s, time.perf_counter() - t0,
                         phase)
            outcomes, nodes, phase, detect_s = rejoined, self._nodes(), "recovery", time.perf_counter() - t0
            t0 = time.perf_counter()
            decision, order = self._replace_or_shrink(k, outcomes, self._decide([o.status for o in outcomes], True),
                                                      phase)
            replace_s = time.perf_counter() - t0
        self.world_size = decision.world_size
        self.committed_updates, self.committed_step = good.manifest["optimizer_step"], start
        self.position = good.manifest.get("data_position")
        self.history = [h for h in self.history if h["step"] <= start]
        self.on_rewind(start)
        if self.checkpoints is not None:
            self.checkpoints.forget_after(start)
        self._record(k, outcomes, nodes, restarting(decision), detect_s, replace_s, time.perf_counter() - t0, phase)
        log.warning("step %d: %s; back to the checkpoint of step %d, redoing %d steps", k + 1, lost, start, k - start)
        return start

    def _newest_checkpoint(self, committed: int):
        from distopt.checkpoint import CheckpointError
        from distopt.runtime.checkpointing import load_for_resume
        if self.checkpoints is None:
            return None
        # The survivors' finished writes may complete a checkpoint whose manifest is not out yet.
        self.checkpoints.add(self.group.flush_checkpoints())
        self.checkpoints.finish(committed)
        try:
            return load_for_resume(self.config.checkpoint_dir)
        except (CheckpointError, FileNotFoundError):
            return None

    def _nodes(self) -> list:
        """Each current rank's node (empty for groups that do not know nodes)."""
        return list(getattr(self.group, "nodes", []))

    def _record(self, k: int, outcomes, nodes: list, decision: policy.Decision, detect_s: float, replace_s: float,
                restore_s: float, phase: str | None = None) -> None:
        """One failure record per lost rank; ``nodes`` are those of the ranks ``outcomes`` names."""
        observed = phase or _observed_phase(outcomes)
        lost = decision.lost or (None,)
        for rank in lost:
            status = outcomes[rank].status if rank is not None else None
            record = {"step": k + 1, "rank": rank, "node": nodes[rank] if rank is not None and rank < len(nodes)
                      else None, "phase": observed,
                      "cause": "hung (missed the step deadline)" if status and status.hung else
                      "process died" if status else "collective failed, every worker alive",
                      "action": decision.action, "world_size": decision.world_size,
                      "detect_s": detect_s, "replace_s": replace_s, "restore_s": restore_s}
            self.failures.append(record)
            self._fire("on_failure", record)
            log.warning("step %d: rank %s failed (%s, seen in %s); %s -> %d workers, detect %.2fs replace %.2fs "
                        "restore %.2fs", k + 1, rank, record["cause"], observed, decision.action,
                        decision.world_size, detect_s, replace_s, restore_s)

    def _give_up(self, k: int, outcomes, decision: policy.Decision, phase: str | None = None) -> None:
        from distopt.runtime.results import worker_error
        for o in outcomes:
            if o.status.user_error:
                raise worker_error(o, f"step {k}" if phase is None else f"{phase} after step {k}")
        lost = [o.status.rank for o in outcomes if o.status.dead or o.status.hung]
        self._record(k, outcomes, self._nodes(), decision, 0.0, 0.0, 0.0, phase) if lost else None
        raise RunFailed(f"step {k + 1}: {decision.reason}; ranks lost {lost}", self.failures)


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


def _observed_phase(outcomes) -> str:
    for o in outcomes:
        message = o.status.collective_error or ""
        for op, phase in _PHASE_OF_OP.items():
            if message.startswith(op):
                return phase
    return "unknown (no survivor reached a collective)"
