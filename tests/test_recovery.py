"""Redundancy and recovery in one process: a rank lost at each phase costs no bit."""
from __future__ import annotations

import pytest
import torch

from distopt.collectives import CollectiveError, in_process, run_ranks
from distopt.ft import RecoveryError, Redundancy, assemble, holders, packets, replica_distance
from distopt.optim import ShardedOptimizer, StepHooks, adam, muon, sgd
from distopt.optim.params import plan_params

from odd_params import grads_of as _grads, init_params as _init

RULES = {
    "adam_l2": lambda: adam(1e-2, weight_decay=0.05),
    "adamw": lambda: adam(1e-2, weight_decay=0.05, decoupled=True),
    "sgd_nesterov": lambda: sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "muon_adamw": lambda: adam(1e-2, weight_decay=0.05, decoupled=True),  # and Muon on the matrix: _groups
}


def _groups(rule, params):
    """The optimizer's params: with ``muon_adamw``, Muon for the one matrix, AdamW for the rest."""
    if rule != "muon_adamw":
        return params
    return [{"params": {"p0": params["p0"]}, "rule": muon(0.02)},
            {"params": {n: t for n, t in params.items() if n != "p0"}}]


def _opt(comm, rule, stage, replicate=True, params=None, sync=True, distance=1, **kw):
    """Parameters, their optimizer and its redundancy (None without ``replicate``)."""
    params = params if params is not None else _init()
    opt = ShardedOptimizer(_groups(rule, params), RULES[rule](), comm, zero_stage=stage, bucket_bytes=512, sync_params=sync, **kw)
    return params, opt, Redundancy(opt, distance=distance) if replicate else None


def _step(opt, red, grads):
    """One step as the worker runs it: the last step has committed, then the update."""
    if red is not None:
        red.commit(opt.step_count)
    opt.step(grads=grads)
    return opt.info


class _Dies(StepHooks):
    """Closes the rank's communicator and exits at ``phase`` (a killed process)."""

    def __init__(self, comm, phase: str) -> None:
        self.comm, self.at = comm, phase

    def phase(self, name: str, step: int) -> None:
        if name == self.at:
            self.comm.close()  # the process is gone: its sockets close
            raise SystemExit("killed")


def _same_shard(params, state, opt) -> bool:
    return all(torch.equal(a, b) for a, b in zip(params, opt.shard_params)) and \
        all(torch.equal(a, b) for mine, theirs in zip(state.values(), opt.shard_state.values()) for a, b in zip(mine, theirs))


def _run(w, rule, stage, steps, replicate):
    def body(comm):
        params, opt, red = _opt(comm, rule, stage, replicate)
        for k in range(steps):
            _step(opt, red, _grads(k, comm.rank))
        return params, opt, red
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
    for (p1, _, _), (p2, _, _) in zip(plain, kept):
        assert all(torch.equal(p1[n], p2[n]) for n in p1)
    assert all(red.shared == (transport == "window") for _, _, red in kept)
    for _, opt, red in kept:
        red.commit(opt.step_count)
    for r, (_, opt, red) in enumerate(kept):
        rep = red.replica_at_commit()
        assert rep.step == 6
        assert _same_shard(rep.params, rep.state, kept[(r - 1) % 3][1])


def _recover(comm, old_rank, opt, red, params, alive, old_world, rule, stage, committed, distance=1):
    """What a worker does after a failure: roll back, assemble on the new group, rebuild.
    Returns the new optimizer and its redundancy."""
    mine = {}
    if opt is not None:
        red.rollback(committed)
        mine = packets(opt, red, old_rank)
        opt.close()  # its gradient hooks must not fire into the replaced optimizer
    old = plan_params(_groups(rule, params), RULES[rule](), old_world, stage, 512)
    old_plan, names = old.plan, old.names
    full_params, full = assemble(comm, old_plan, RULES[rule](), old.fields, names, [params[n].shape for n in names],
                                 holders(old_plan.world_size, alive, stage >= 1, distance), mine, committed,
                                 torch.float32, torch.device("cpu"))
    with torch.no_grad():
        for name, t in params.items():
            t.copy_(full_params[name])
    _, new, new_red = _opt(comm, rule, stage, params=params, sync=False)
    new.load_full_state_dict(full)  # the redundancy rebuilds its copies on its hook
    return new, new_red


@pytest.mark.parametrize("phase", ["grad_collective", "shard_update", "param_gather"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_rank_lost_mid_step_is_replaced_bit_for_bit(phase, stage, transport):
    _lost_mid_step("adam_l2", phase, stage)


@pytest.mark.parametrize("stage", [1, 2])
def test_muon_beside_adamw_lost_mid_update_is_replaced_bit_for_bit(stage, transport):
    _lost_mid_step("muon_adamw", "shard_update", stage)


def _lost_mid_step(rule, phase, stage):
    w, fail_step, total = 3, 5, 8
    expected = _run(w, rule, stage, total, False)
    comms = in_process(w, timeout_s=5)

    def first_part(comm):
        params, opt, red = _opt(comm, rule, stage)
        for k in range(fail_step - 1):
            _step(opt, red, _grads(k, comm.rank))
        if comm.rank == 1:
            opt.register_hooks(_Dies(comm, phase))
        try:
            _step(opt, red, _grads(fail_step - 1, comm.rank))
        except (CollectiveError, SystemExit):
            return params, opt, red, True
        return params, opt, red, False

    state = run_ranks(comms, first_part)
    assert state[1][3], "rank 1 must have died"  # survivors may finish: the step is still not committed
    for c in comms:
        c.close()
    new_comms = in_process(w, timeout_s=5)

    def second_part(comm):
        if comm.rank == 1:
            params, opt, red = _init(), None, None  # a fresh replacement
        else:
            params, opt, red, _ = state[comm.rank]
        opt, red = _recover(comm, comm.rank, opt, red, params, {0: 0, 2: 2}, w, rule, stage, fail_step - 1)
        for k in range(fail_step - 1, total):
            _step(opt, red, _grads(k, comm.rank))
        return params

    for got, (want, _, _) in zip(run_ranks(new_comms, second_part), expected):
        assert all(torch.equal(got[n], want[n]) for n in want), "recovery changed bits"


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("rule", ["adamw", "muon_adamw"])
def test_shrink_from_three_to_two_ranks_keeps_the_math(stage, rule):
    total = 8
    same = lambda k: _grads(k, 0)  # every rank sees the global gradient: the mean is independent of N

    def uninterrupted(comm):
        params, opt, red = _opt(comm, rule, stage)
        for k in range(total):
            _step(opt, red, same(k))
        return params

    expected = run_ranks(in_process(3), uninterrupted)[0]

    def first_part(comm):
        params, opt, red = _opt(comm, rule, stage)
        for k in range(4):
            _step(opt, red, same(k))
        return params, opt, red

    state = run_ranks(in_process(3), first_part)
    alive = {0: 0, 2: 1}  # old rank 1 is gone; old 2 becomes new 1

    def second_part(args):
        comm, old = args
        params, opt, red = state[old]
        opt, red = _recover(comm, old, opt, red, params, alive, 3, rule, stage, 4)
        for k in range(4, total):
            _step(opt, red, same(k))
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
        params, opt, red = _opt(comm, rule, stage, distance=d)
        for k in range(fail_step - 1):
            _step(opt, red, _grads(k, comm.rank))
        if comm.rank in (2, 3):
            opt.register_hooks(_Dies(comm, "shard_update"))
        try:
            _step(opt, red, _grads(fail_step - 1, comm.rank))
        except (CollectiveError, SystemExit):
            return params, opt, red
        return params, opt, red

    state = run_ranks(comms, first_part)
    for c in comms:
        c.close()

    def second_part(comm):
        params, opt, red = (_init(), None, None) if comm.rank in (2, 3) else state[comm.rank]
        opt, red = _recover(comm, comm.rank, opt, red, params, {0: 0, 1: 1}, w, rule, stage, fail_step - 1, d)
        for k in range(fail_step - 1, total):
            _step(opt, red, _grads(k, comm.rank))
        return params

    for got, (want, _, _) in zip(run_ranks(in_process(w, timeout_s=5), second_part), expected):
        assert all(torch.equal(got[n], want[n]) for n in want), "recovery changed bits"


def test_clipped_steps_replay_to_the_owners_bits(transport):
    """With clipping on, the holder clips the owner's gradient shard as the owner did."""
    def body(comm):
        _, opt, red = _opt(comm, "adam_l2", 1, max_grad_norm=0.01)
        for k in range(4):
            info = _step(opt, red, _grads(k, comm.rank))
            assert info.grad_norm > 0.01  # every step is clipped
        red.commit(opt.step_count)
        return opt, red

    kept = run_ranks(in_process(3, timeout_s=10), body)
    for r, (_, red) in enumerate(kept):
        rep = red.replica_at_commit()
        assert _same_shard(rep.params, rep.state, kept[(r - 1) % 3][0])


def test_on_one_host_an_uncommitted_update_is_undone_from_the_replica_in_its_own_window():
    """No copy of its own on one host: rank 0 takes back the replica rank 1 keeps of it in rank
    0's window (at the commit), and refuses when that replica is not at the commit."""
    two, three = _run(2, "adamw", 1, 2, True), _run(2, "adamw", 1, 3, True)  # update 3 never committed
    _, opt, red = three[0]
    assert red.shared and red.snapshot is None and red.own_log is None
    assert red.window.own.replica_step == 2
    red.window.own.steps[0] = 1  # as if its holder had not replayed update 2
    with pytest.raises(RecoveryError, match="replica holds update 1, not the commit 2"):
        red.rollback(2)
    red.window.own.steps[0] = 2
    red.rollback(2)
    assert _same_shard(opt.shard_params, opt.shard_state, two[0][1])


def test_an_optimizer_whose_redundancy_fails_to_form_leaves_no_gradient_hooks(monkeypatch):
    """Forming the redundancy is a collective: a peer lost meanwhile (a recovery cut short)
    makes it raise. The optimizer just built must take its gradient hooks with it, or every
    later backward also runs them, into buckets it never reduces again."""
    from distopt.runtime import worker as worker_module
    from distopt.runtime.config import TrainConfig
    from distopt.runtime.groups import ScalingConfig
    from trainer_task import loss, make_data, make_model

    config = TrainConfig(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2), global_batch_size=16,
                         zero_stage=1, seed=0, scaling=ScalingConfig(num_workers=1))
    worker = worker_module.Worker(config, 0)

    def peer_lost(*args, **kwargs):
        raise CollectiveError("broadcast failed on rank 0 of 2: a peer is gone")
    with monkeypatch.context() as m:
        m.setattr(worker_module, "Redundancy", peer_lost)
        with pytest.raises(CollectiveError):
            worker.attach(in_process(1)[0])
    worker.attach(in_process(1)[0])
    assert [worker.run_step(k).updates for k in range(3)] == [1, 2, 3]
    worker.close()
