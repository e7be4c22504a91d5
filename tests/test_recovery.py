"""Redundancy and recovery in one process: a rank lost at each phase costs no bit."""
from __future__ import annotations

import pytest
import torch

from distopt.collectives import CollectiveError, in_process, run_ranks
from distopt.optim import ShardedOptimizer, adam, sgd
from distopt.optim.sharded import build_plan
from distopt.optim.recovery import assemble, holders, packets
from distopt.optim.redundancy import RecoveryError, replica_distance

from odd_params import grads_of as _grads, init_params as _init

RULES = {
    "adam_l2": lambda: adam(1e-2, weight_decay=0.05),
    "adamw": lambda: adam(1e-2, weight_decay=0.05, decoupled=True),
    "sgd_nesterov": lambda: sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
}




def _opt(comm, rule, stage, replicate=True, params=None, sync=True, distance=1):
    params = params if params is not None else _init()
    return params, ShardedOptimizer(params, RULES[rule](), comm, zero_stage=stage, bucket_bytes=512,
                                    replicate=replicate, sync_params=sync, replica_distance=distance)


def _run(w, rule, stage, steps, replicate):
    def body(comm):
        params, opt = _opt(comm, rule, stage, replicate)
        for k in range(steps):
            opt.step(_grads(k, comm.rank))
        return params, opt
    return run_ranks(in_process(w, timeout_s=10), body)


@pytest.fixture(params=["window", "shift"])
def transport(request, monkeypatch):
    """The gradients reach the replica's holder through shared memory, or with a ring shift."""
    if request.param == "shift":
        monkeypatch.setenv("DISTOPT_SHM", "0")
    return request.param


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("stage", [1, 2])
def test_redundancy_changes_no_bit_and_replicas_match_their_owner(rule, stage, transport):
    plain, kept = _run(3, rule, stage, 6, False), _run(3, rule, stage, 6, True)
    for (p1, _), (p2, _) in zip(plain, kept):
        assert all(torch.equal(p1[n], p2[n]) for n in p1)
    opts = [opt for _, opt in kept]
    assert all(opt.redundancy.shared == (transport == "window") for opt in opts)
    for opt in opts:
        opt.redundancy.commit(opt.step_count)
    for r, opt in enumerate(opts):
        left = opts[(r - 1) % 3]
        rep = opt.redundancy.replica_at_commit()
        assert rep.step == 6
        assert all(torch.equal(a, b) for a, b in zip(rep.params, left._p_shards))
        for mine, theirs in zip(rep.state, left.state):
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def _recover(comm, old_rank, opt, params, alive, old_world, rule, stage, committed, distance=1):
    """What a worker does after a failure: roll back, assemble on the new group, rebuild."""
    mine = {}
    if opt is not None:
        opt.rollback(committed)
        mine = packets(opt, old_rank)
    old_plan = build_plan(list(params), list(params.values()), old_world, stage, 512)
    hold = holders(old_plan.world_size, alive, stage >= 1, distance)
    full_params, full = assemble(comm, old_plan, RULES[rule](), list(params), [t.shape for t in params.values()],
                                 hold, mine, committed, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        for name, t in params.items():
            t.copy_(full_params[name])
    _, new = _opt(comm, rule, stage, params=params, sync=False)
    new.load_full_state_dict(full)
    return new


@pytest.mark.parametrize("phase", ["grad_collective", "shard_update", "param_gather"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_rank_lost_mid_step_is_replaced_bit_for_bit(phase, stage, transport):
    rule, w, fail_step, total = "adam_l2", 3, 5, 8
    expected = _run(w, rule, stage, total, False)
    comms = in_process(w, timeout_s=5)

    def first_part(comm):
        params, opt = _opt(comm, rule, stage)
        for k in range(fail_step - 1):
            opt.step(_grads(k, comm.rank))
        if comm.rank == 1:
            def die(p, step):
                if p == phase:
                    comm.close()  # the process is gone: its sockets close
                    raise SystemExit("killed")
            opt.on_phase = die
        try:
            opt.step(_grads(fail_step - 1, comm.rank))
        except (CollectiveError, SystemExit):
            return params, opt, True
        return params, opt, False

    state = run_ranks(comms, first_part)
    assert state[1][2], "rank 1 must have died"  # survivors may finish: the step is still not committed
    for c in comms:
        c.close()
    new_comms = in_process(w, timeout_s=5)

    def second_part(comm):
        if comm.rank == 1:
            params, opt = _init(), None  # a fresh replacement
        else:
            params, opt, _ = state[comm.rank]
        opt = _recover(comm, comm.rank, opt, params, {0: 0, 2: 2}, w, rule, stage, fail_step - 1)
        for k in range(fail_step - 1, total):
            opt.step(_grads(k, comm.rank))
        return params

    for got, (want, _) in zip(run_ranks(new_comms, second_part), expected):
        assert all(torch.equal(got[n], want[n]) for n in want), "recovery changed bits"


@pytest.mark.parametrize("stage", [1, 2])
def test_shrink_from_three_to_two_ranks_keeps_the_math(stage):
    rule, total = "adamw", 8
    same = lambda k: _grads(k, 0)  # every rank sees the global gradient: the mean is independent of N

    def uninterrupted(comm):
        params, opt = _opt(comm, rule, stage)
        for k in range(total):
            opt.step(same(k))
        return params

    expected = run_ranks(in_process(3), uninterrupted)[0]

    def first_part(comm):
        params, opt = _opt(comm, rule, stage)
        for k in range(4):
            opt.step(same(k))
        return params, opt

    state = run_ranks(in_process(3), first_part)
    alive = {0: 0, 2: 1}  # old rank 1 is gone; old 2 becomes new 1

    def second_part(args):
        comm, old = args
        params, opt = state[old]
        opt = _recover(comm, old, opt, params, alive, 3, rule, stage, 4)
        for k in range(4, total):
            opt.step(same(k))
        return params

    for got in run_ranks(list(zip(in_process(2), [0, 2])), second_part):
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-6)


def test_shard_and_its_replica_both_lost_is_refused():
    with pytest.raises(RecoveryError, match="shard 1 and its replica on rank 2 were both lost"):
        holders(4, {0: 0, 3: 1}, True)
    assert holders(4, {0: 0, 2: 1, 3: 2}, True) == [0, 1, 1, 2]
    assert holders(1, {2: 1, 3: 0}, False) == [0]


def test_replica_distance_puts_every_replica_on_another_node():
    assert replica_distance(["a"]) == (1, [0])
    assert replica_distance(["a"] * 4) == (1, [0, 1, 2, 3])  # one node: nothing to separate
    assert replica_distance(["a", "b", "a", "b"]) == (1, [])
    assert replica_distance(["a", "a", "b", "b"]) == (2, [])  # packed two to a node
    assert replica_distance(["a"] * 3 + ["b"] * 3 + ["c"] * 3) == (3, [])
    assert replica_distance(["a", "a", "a", "b"]) == (1, [0, 1])  # "a" holds more than half: the fewest shared


def test_holders_follow_the_replica_distance():
    assert holders(4, {0: 0, 1: 1}, True, distance=2) == [0, 1, 0, 1]  # ranks 2, 3 (one node) lost
    with pytest.raises(RecoveryError, match="shard 1 and its replica on rank 3 were both lost"):
        holders(4, {0: 0, 2: 1}, True, distance=2)


def test_replica_distance_must_fit_the_world():
    comm = in_process(1)[0]
    with pytest.raises(ValueError, match="replica_distance=2 must be an int in"):
        _opt(comm, "adamw", 1, distance=2)
    comm.close()


@pytest.mark.parametrize("stage", [1, 2])
def test_two_neighbours_lost_together_come_back_from_replicas_two_ranks_away(stage):
    """Ranks packed two to a node (0, 1 | 2, 3) with distance 2: losing ranks 2 and 3 (a node)
    loses no shard together with its replica."""
    rule, w, fail_step, total, d = "adamw", 4, 4, 7, 2
    expected = _run(w, rule, stage, total, False)
    comms = in_process(w, timeout_s=5)

    def first_part(comm):
        params, opt = _opt(comm, rule, stage, distance=d)
        for k in range(fail_step - 1):
            opt.step(_grads(k, comm.rank))
        if comm.rank in (2, 3):
            def die(p, step):
                if p == "shard_update":
                    comm.close()
                    raise SystemExit("killed")
            opt.on_phase = die
        try:
            opt.step(_grads(fail_step - 1, comm.rank))
        except (CollectiveError, SystemExit):
            return params, opt
        return params, opt

    state = run_ranks(comms, first_part)
    for c in comms:
        c.close()

    def second_part(comm):
        params, opt = (_init(), None) if comm.rank in (2, 3) else state[comm.rank]
        opt = _recover(comm, comm.rank, opt, params, {0: 0, 1: 1}, w, rule, stage, fail_step - 1, d)
        for k in range(fail_step - 1, total):
            opt.step(_grads(k, comm.rank))
        return params

    for got, (want, _) in zip(run_ranks(in_process(w, timeout_s=5), second_part), expected):
        assert all(torch.equal(got[n], want[n]) for n in want), "recovery changed bits"


def test_clipped_steps_replay_to_the_owners_bits(transport):
    """With clipping on, the holder clips the owner's gradient shard as the owner did."""
    def body(comm):
        params = _init()
        opt = ShardedOptimizer(params, RULES["adam_l2"](), comm, zero_stage=1, bucket_bytes=512, replicate=True,
                               max_grad_norm=0.01)
        for k in range(4):
            info = opt.step(_grads(k, comm.rank))
            assert info.grad_norm > 0.01  # every step is clipped
        opt.redundancy.commit(opt.step_count)
        return opt

    opts = run_ranks(in_process(3, timeout_s=10), body)
    for r, opt in enumerate(opts):
        left = opts[(r - 1) % 3]
        rep = opt.redundancy.replica_at_commit()
        assert all(torch.equal(a, b) for a, b in zip(rep.params, left._p_shards))
        for mine, theirs in zip(rep.state, left.state):
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_on_one_host_an_uncommitted_update_is_undone_from_the_holders_copy_and_the_log():
    """No snapshot on one host: rank 0 rebuilds its last committed shard from the chunks rank 1
    copied and the gradients rank 0 logged, and refuses when a step it needs is no longer logged."""
    def run(steps):
        def body(comm):
            params, opt = _opt(comm, "adamw", 1)
            for k in range(steps):
                opt.step(_grads(k, comm.rank))
            return opt
        return run_ranks(in_process(2, timeout_s=10), body)

    two, three = run(2), run(3)  # the third update is treated as never committed
    red = three[0].redundancy
    assert red.shared and red.snapshot is None
    logged = red.log.own.steps.clone()
    red.log.own.steps.fill_(-1)
    with pytest.raises(RecoveryError, match="gradients of update 1 are no longer logged"):
        three[0].rollback(2)
    red.log.own.steps.copy_(logged)
    three[0].rollback(2)
    assert all(torch.equal(a, b) for a, b in zip(three[0]._p_shards, two[0]._p_shards))
    for mine, want in zip(three[0].state, two[0].state):
        assert all(torch.equal(a, b) for a, b in zip(mine, want))
