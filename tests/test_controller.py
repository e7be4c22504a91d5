"""The step controller against a scripted worker group: no Ray, no processes.

The group plays back what a real one would report (a rank dead in a step, another lost
while the group is re-formed, a rank lost while growing back) and records what the
controller asks of it: which ranks, which holders of which shards.
"""
from __future__ import annotations

import pytest
import torch

from distopt.collectives import free_port
from distopt.collectives.in_process import run_ranks
from distopt.optim import adam
from distopt.runtime.config import TrainConfig
from distopt.runtime.controller import Controller, RunFailed
from distopt.runtime.groups import FailureConfig, ScalingConfig
from distopt.runtime.policy import Outcome, WorkerStatus
from distopt.runtime.worker import StepReport, Worker
from trainer_task import loss, make_data, make_model


def _ok(world: int, step: int = 0) -> list[Outcome]:
    return [Outcome(WorkerStatus(r), StepReport(r, step, 1.0, updates=step + 1)) for r in range(world)]


def _lost(world: int, dead: int, op: str) -> list[Outcome]:
    """``dead`` died; the others saw collective ``op`` break under them."""
    return [Outcome(WorkerStatus(r, ok=False, dead=True)) if r == dead else
            Outcome(WorkerStatus(r, ok=False, collective_error=f"{op}: peer closed the connection"))
            for r in range(world)]


class ScriptedGroup:
    """A worker group whose failures come from a script: ``fail_step[k]`` (rank dying in
    step k), ``fail_regroup`` (one list of ranks per regroup call), ``fail_grow``."""

    def __init__(self, world: int, fail_step=None, fail_regroup=(), fail_grow=None, ready=0,
                 can_replace=True) -> None:
        self.world, self.fail_step, self.fail_regroup = world, dict(fail_step or {}), list(fail_regroup)
        self.fail_grow, self.ready, self.can_replace = fail_grow, ready, can_replace
        self.nodes = [f"n{r}" for r in range(world)]  # each rank's node, moved as the real group moves them
        self.calls: list[tuple] = []
        self.episodes: list[int] = []  # the episode each regroup or grow belonged to

    def run_step(self, k: int, position=None) -> list[Outcome]:
        self.calls.append(("step", k))
        dead = self.fail_step.pop(k, None)
        return _ok(self.world, k) if dead is None else _lost(self.world, dead, "allgather")

    def refill_spares(self) -> None:
        self.calls.append(("refill",))

    def replace(self, lost, step=-1) -> bool:
        self.calls.append(("replace", tuple(lost)))
        if self.can_replace:
            for r in lost:
                self.nodes[r] = f"new-{r}"
        return self.can_replace

    def regroup(self, committed, order, holder_of, old_world, keep, episode) -> list[Outcome]:
        self.calls.append(("regroup", list(order), list(holder_of), old_world, keep))
        self.episodes.append(episode)
        self.world = len(order)
        self.nodes = [self.nodes[o] for o in order]
        dead = self.fail_regroup.pop(0) if self.fail_regroup else None
        out = _ok(self.world) if dead is None else _lost(self.world, dead, "broadcast")
        if dead is None:
            self.world = keep
            del self.nodes[keep:]
        return out

    def ready_to_grow(self, target: int) -> int:
        return self.ready

    def grow(self, committed, count, episode) -> list[Outcome]:
        self.calls.append(("grow", count))
        self.episodes.append(episode)
        self.nodes += [f"grown-{r}" for r in range(self.world, self.world + count)]
        self.world += count
        self.ready = 0
        dead, self.fail_grow = self.fail_grow, None
        return _ok(self.world) if dead is None else _lost(self.world, dead, "broadcast")


def _controller(group: ScriptedGroup, workers: int, **failure) -> Controller:
    config = TrainConfig(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2), global_batch_size=16,
                         scaling=ScalingConfig(num_workers=workers), failure=FailureConfig(**failure))
    return Controller(group, config, on_commit=lambda entry: None)


def test_rank_lost_during_the_recovery_recovers_again_from_the_same_commit():
    # 4 ranks, stage 1: rank 1 dies in step 3, then rank 3 while the group is re-formed.
    group = ScriptedGroup(4, fail_step={2: 1}, fail_regroup=[3])
    ctl = _controller(group, 4)
    ctl.run(0, 5)
    regroups = [c for c in group.calls if c[0] == "regroup"]
    # First attempt: shard 1 from rank 2's replica. Second: rank 3 is gone too, so shard 3
    # comes from rank 0's replica and shard 1 still from rank 2 (the new rank 1 holds nothing).
    assert regroups[0][1:] == ([0, 1, 2, 3], [0, 2, 2, 3], 4, 4)
    assert regroups[1][1:] == ([0, 1, 2, 3], [0, 2, 2, 0], 4, 4)
    assert [c for c in group.calls if c[0] == "replace"] == [("replace", (1,)), ("replace", (3,))]
    assert [(f["rank"], f["step"], f["phase"]) for f in ctl.failures] == [(1, 3, "param_gather"), (3, 3, "recovery")]
    assert [h["step"] for h in ctl.history] == [1, 2, 3, 4, 5]
    assert group.episodes == [1, 1]  # both attempts offer what the ranks held at the commit


def test_failure_records_name_the_node_the_rank_was_on_before_the_group_moved():
    # Rank 2 (node n2) dies and cannot be replaced: the group shrinks to [0, 1, 3] and keeps
    # 2; old rank 3 (node n3, now rank 2) dies while it re-forms. Each record names the node
    # of the rank when it failed, not whatever sits at that index after the group moved.
    group = ScriptedGroup(4, fail_step={1: 2}, fail_regroup=[2], can_replace=False)
    group.replica_distance = 2  # shards 2 and 3 are replicated on ranks 0 and 1
    ctl = _controller(group, 4)
    ctl.run(0, 3)
    assert [(f["rank"], f["node"], f["action"]) for f in ctl.failures] == [(2, "n2", "shrink"), (2, "n3", "shrink")]
    assert group.nodes == ["n0", "n1"] and [h["step"] for h in ctl.history] == [1, 2, 3]


def test_spares_used_by_a_recovery_are_refilled_only_once_a_step_commits_again():
    # A new spare's start (process, imports, model) must not compete with the recovery for
    # the node's cores: the group may start it only after the redone step committed.
    group = ScriptedGroup(2, fail_step={2: 1})
    _controller(group, 2).run(0, 4)
    kinds = [c[0] for c in group.calls]
    assert kinds == ["step", "refill", "step", "refill", "step", "replace", "regroup", "step", "refill", "step",
                     "refill"]


def test_rank_lost_during_the_recovery_counts_against_max_failures():
    group = ScriptedGroup(4, fail_step={2: 1}, fail_regroup=[3])
    with pytest.raises(RunFailed, match="exceed max_failures=1") as info:
        _controller(group, 4, max_failures=1).run(0, 5)
    assert [f["rank"] for f in info.value.failures] == [1, 3]


def test_neighbours_lost_one_after_the_other_need_a_checkpoint():
    # Rank 2 dies in a step, then rank 1 while the group is re-formed: shard 1's replica
    # lived on rank 2, so memory no longer holds shard 1.
    group = ScriptedGroup(4, fail_step={1: 2}, fail_regroup=[1])
    with pytest.raises(RunFailed, match="no checkpoint to fall back on"):
        _controller(group, 4).run(0, 3)


def test_rank_lost_while_growing_back_is_recovered_before_the_step():
    # A shrunk group of 1 (of 2 wanted) grows back; the newcomer dies during the regroup:
    # rank 0 still holds the whole commit, the newcomer is replaced, and the step runs.
    group = ScriptedGroup(1, fail_grow=1, ready=1)
    ctl = _controller(group, 2)
    ctl.world_size = 1
    ctl.run(0, 2)
    assert group.calls[0] == ("grow", 1)
    assert group.calls[1:3] == [("replace", (1,)), ("regroup", [0, 1], [0], 1, 2)]
    assert [(f["rank"], f["phase"]) for f in ctl.failures] == [(1, "grow back")]
    assert ctl.world_size == 2 and [h["step"] for h in ctl.history] == [1, 2]
    assert group.episodes == [1, 1]  # the failed growth is redone within its own episode


def test_each_recovery_is_a_new_episode():
    # Two failures in different steps: the second recovery must not reuse the first's offers.
    group = ScriptedGroup(2, fail_step={1: 1, 3: 0})
    ctl = _controller(group, 2)
    ctl.run(0, 5)
    assert group.episodes == [1, 2]


def _workers_run(workers, steps) -> None:
    run_ranks(workers, lambda w: [w.run_step(k) for k in steps], timeout_s=60)


def test_growing_back_right_after_a_shrink_offers_the_shrunk_groups_shards():
    # Real workers (threads, gloo on loopback): 2 ranks train, rank 1 is lost and the group
    # shrinks to rank 0, which then grows back at once, with no step in between. The growth
    # is a new episode: rank 0 offers its shard of the 1-rank plan, not what it offered to
    # the shrink, and the run ends with the bits of a run that never lost anyone.
    config = TrainConfig(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2), global_batch_size=16,
                         zero_stage=1, seed=0, scaling=ScalingConfig(num_workers=2),
                         failure=FailureConfig(collective_timeout_s=20))
    clean = [Worker(config, r) for r in range(2)]
    port = free_port()
    run_ranks(clean, lambda w: w.connect("127.0.0.1", port), timeout_s=60)
    _workers_run(clean, range(6))

    a, b = Worker(config, 0), Worker(config, 1)
    port = free_port()
    run_ranks([a, b], lambda w: w.connect("127.0.0.1", port), timeout_s=60)
    _workers_run([a, b], range(3))
    updates = a.optimizer.step_count
    b.close()
    a.recover("127.0.0.1", free_port(), "shrunk", 0, 1, updates, [0, 0], 2, keep=1, episode=1)
    c = Worker(config, 1, incarnation=1)
    port = free_port()
    run_ranks([(a, 0), (c, 1)], lambda wr: wr[0].recover("127.0.0.1", port, "grown", wr[1], 2, updates, [0], 1,
                                                         keep=2, episode=2), timeout_s=60)
    _workers_run([a, c], range(3, 6))
    for name, t in clean[0].model.state_dict().items():
        assert torch.equal(t, a.model.state_dict()[name]) and torch.equal(t, c.model.state_dict()[name]), name
    for w in clean + [a, c]:
        w.close()
