"""How the step controller handles a failure: the policy decides, lost ranks are replaced
(or the group shrinks), the group is re-formed from memory, or, where a shard and its
replica died together, from the newest checkpoint; every lost rank leaves a record.

The other half of :class:`distopt.runtime.controller.Controller`.
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
from distopt.runtime.errors import RunFailed, WorkerLost
from distopt.runtime.policy import Outcome, WorkerStatus

log = logging.getLogger("distopt")

_PHASE_OF_OP = {"reduce_scatter": "grad_collective", "allreduce": "grad_collective", "shift": "shard_update",
                "allgather": "param_gather", "broadcast": "recovery"}


class FailureHandling:
    """The recovery steps of a :class:`~distopt.runtime.controller.Controller`, which
    provides the fields below and ``_fire(hook, record)``."""

    group: Any
    config: TrainConfig
    on_rewind: Callable[[int], None]
    history: list[dict]
    failures: list[dict]
    committed_updates: int
    committed_step: int
    position: dict | None
    world_size: int
    episodes: int
    checkpoints: Coordinator | None

    def _decide(self, statuses, can_replace: bool) -> policy.Decision:
        c = self.config
        return policy.decide(statuses, len(self.failures), c.max_failures, c.min_workers, c.global_batch_size,
                             c.gradient_accumulation_steps, can_replace)

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


def _observed_phase(outcomes) -> str:
    for o in outcomes:
        message = o.status.collective_error or ""
        for op, phase in _PHASE_OF_OP.items():
            if message.startswith(op):
                return phase
    return "unknown (no survivor reached a collective)"
