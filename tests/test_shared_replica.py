"""The one-host redundancy: the replica lives in its owner's shared memory and its holder
replays each committed update onto it."""
from __future__ import annotations

import pytest
import torch

from distopt.collectives import in_process, run_ranks
from distopt.ft import RecoveryError, Redundancy, Shard
from distopt.optim import ShardedOptimizer, adam, muon, sgd

from odd_params import grads_of as _grads, init_params as _init, run_committed, same_shard as _same_shard

RULES = {"adamw_clipped": lambda: adam(1e-2, weight_decay=0.05, decoupled=True),
         "adam_l2": lambda: adam(1e-2, weight_decay=0.05),
         "sgd_momentum": lambda: sgd(0.05, momentum=0.9, weight_decay=0.01)}


def _run(world, steps, rule="adam_l2", replicate=True, stage=1, clip=0.01):
    """Each rank's parameters, optimizer and redundancy (None without ``replicate``) after
    ``steps`` steps, each but the last committed (as the worker commits before a step)."""
    return run_committed(world, steps, RULES[rule], stage, clip, Redundancy if replicate else None)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_replica_in_the_owners_window_is_the_owner_at_the_commit(rule, stage):
    plain, kept = _run(3, 9, rule, replicate=False, stage=stage), _run(3, 9, rule, stage=stage)
    for (p1, _, _), (p2, _, red) in zip(plain, kept):
        assert red.shared and red.own_log is None and red.snapshot is None and red.replica is None
        assert all(torch.equal(p1[n], p2[n]) for n in p1), "the redundancy changed a bit"
    for _, opt, red in kept:
        red.commit(opt.step_count)  # (commits do not wait for each other: one rank after the other here)
    for r, (_, _, red) in enumerate(kept):
        rep = red.replica_at_commit()
        assert rep.step == 9 and _same_shard(rep.params, rep.state, kept[(r - 1) % 3][1])
        # The owner sees the same memory: its window holds what its holder wrote.
        own = kept[(r - 1) % 3][2].window.own
        assert all(a.data_ptr() != b.data_ptr() and torch.equal(a, b) for a, b in zip(own.replica.params, rep.params))


def test_the_commit_is_replayed_before_the_owner_can_overwrite_its_gradients():
    """The holder replays update 3 when it commits, before it sends any part of step 4's
    reduction; so its replica is the owner at 3 even when the owner commits and starts
    step 4 first (its reduce-scatter into the window then waits for the holder)."""
    import time

    def body(comm):
        opt = ShardedOptimizer(_init(), RULES["adam_l2"](), comm, zero_stage=2, bucket_bytes=512)
        red = Redundancy(opt)
        for k in range(3):
            red.commit(opt.step_count)
            opt.step(grads=_grads(k, comm.rank))
        at_3 = Shard.like(opt.shard_params, opt)
        at_3.copy_from(opt.shard_params, opt.shard_state, 3)
        if comm.rank == 1:
            time.sleep(0.3)  # rank 0 commits, and reduces step 4 as far as it can, first
        red.commit(3)
        opt.step(grads=_grads(3, comm.rank))
        return red, at_3
    (red0, at_3), (red1, _) = run_ranks(in_process(2, timeout_s=10), body)
    replica = red1.window.left.replica  # rank 1 holds rank 0's replica
    assert red1.window.left.replica_step == 3
    assert _same_shard(replica.params, replica.state, other=at_3)
    assert red0.window.own.replica_step == 3 and int(red0.window.own.steps[1]) == 4


def test_gradients_are_reduced_into_the_window_and_the_state_stays_private():
    """The live state is the rank's own memory; the gradient shard it reduces is in its
    window, where its holder reads it in place."""
    kept = _run(2, 4)
    for r, (_, opt, red) in enumerate(kept):
        own, seen = red.window.own, kept[1 - r][2].window.left
        window = own.grad.untyped_storage()
        assert opt.grad_flat.untyped_storage().data_ptr() == window.data_ptr()
        assert all(t.untyped_storage().data_ptr() != window.data_ptr() for f in opt.shard_state.values() for t in f)
        assert torch.equal(own.grad, seen.grad) and own.grad.data_ptr() != seen.grad.data_ptr()
        assert int(own.steps[1]) == 4 and float(own.scale[0]) == float(seen.scale[0])


def test_a_replay_without_the_commits_gradients_is_refused():
    _, _, red = _run(2, 3)[0]
    red.window.left.steps[1] = 2  # the left neighbour's log holds update 2's gradients, not 3's
    with pytest.raises(RecoveryError, match="replica of rank 1 holds update 2 and its logged gradients are update 2"):
        red.commit(3)


@pytest.mark.parametrize("stage", [1, 2])
def test_the_redundancy_costs_the_replica_and_below_stage_2_a_gradient_shard(stage):
    """Deterministic byte counts: per element of a rank's shard, the replica of its left
    neighbour (parameters and each kept state field) and, at stage 1, its gradient shard
    beside the full gradient buckets. Adam in fp32: 12 (stage 2) and 16 (stage 1) bytes, under
    the 24 of a replica plus an undo copy; a Muon matrix keeps one state field."""
    for _, opt, red in _run(2, 1, "adamw_clipped", stage=stage):
        shard = sum(t.numel() for t in opt.shard_params)
        assert red.nbytes() == (12 if stage == 2 else 16) * shard

    def hybrid():
        g = torch.Generator().manual_seed(1)
        return {n: torch.randn(s, generator=g).requires_grad_() for n, s in {"m0": (16, 16), "v0": (16,)}.items()}

    def body(comm):
        p = hybrid()
        opt = ShardedOptimizer([{"params": {"m0": p["m0"]}, "rule": muon(0.02)}, {"params": {"v0": p["v0"]}}],
                               adam(1e-2), comm, zero_stage=stage, bucket_bytes=512)
        return opt, Redundancy(opt)
    for opt, red in run_ranks(in_process(2, timeout_s=10), body):
        per_field = {b: 1 + len(opt.rules.bucket_fields[b]) for b in range(len(opt.shard_params))}
        want = sum(4 * per_field[b] * t.numel() for b, t in enumerate(opt.shard_params))
        assert red.nbytes() == want + (4 * sum(t.numel() for t in opt.shard_params) if stage == 1 else 0)


def test_a_shard_state_dict_is_refused_and_a_full_state_dict_rebuilds_the_replicas():
    """A rank's own shard cannot rebuild what its holder keeps of it, so the redundancy
    refuses a shard state dict (through the optimizer's load hook) before anything changes;
    the full state dict, loaded on every rank, rebuilds every replica bit for bit."""
    kept = _run(2, 3)
    opts = [opt for _, opt, _ in kept]
    for _, opt, red in kept:
        red.commit(opt.step_count)
    for opt in opts:  # a state that is not the one in memory (another run's, say)
        sd = opt.state_dict()
        before = {k: t.clone() for k, t in sd["state"].items()}
        for t in sd["state"].values():
            t.add_(1.0)
        with pytest.raises(ValueError, match="load_full_state_dict"):
            opt.load_state_dict(sd)
        assert all(torch.equal(before[k], t) for k, t in opt.state_dict()["state"].items()), "a refused load changed state"
    fulls = run_ranks(opts, lambda opt: opt.full_state_dict())
    for full in fulls:
        for fields in full["state"].values():
            for t in fields.values():
                t.add_(1.0)
    for (_, opt, red), full in zip(kept, fulls):
        opt.load_full_state_dict(full)
    for r, (_, opt, red) in enumerate(kept):
        rep = red.replica_at_commit()
        assert rep.step == 3 and _same_shard(rep.params, rep.state, opts[1 - r])
    for got, want in zip(run_ranks(opts, lambda opt: opt.full_state_dict()), fulls):
        assert all(torch.equal(t, want["state"][n][f]) for n, fields in got["state"].items() for f, t in fields.items())


def _hybrid_params():
    g = torch.Generator().manual_seed(1)
    shapes = {"m0": (9, 7), "m1": (7, 9), "m2": (16, 5), "m3": (5, 16), "m4": (12, 12), "v0": (13,), "v1": (101,)}
    return {n: torch.randn(s, generator=g).requires_grad_() for n, s in shapes.items()}


def _hybrid_groups():
    params = _hybrid_params()
    return params, [{"params": {n: t for n, t in params.items() if t.ndim == 2}, "rule": muon(0.02)},
                    {"params": {n: t for n, t in params.items() if t.ndim == 1}}]


def test_muon_matrices_are_replayed_whole_to_the_owners_bits_and_undone():
    def run(steps, replicate):
        def body(comm):
            params, groups = _hybrid_groups()
            opt = ShardedOptimizer(groups, adam(1e-2, weight_decay=0.05, decoupled=True), comm, zero_stage=1,
                                   bucket_bytes=768, max_grad_norm=0.5)
            red = Redundancy(opt) if replicate else None
            for k in range(steps):
                if red is not None:
                    red.commit(opt.step_count)
                g = torch.Generator().manual_seed(100 * k + comm.rank)
                opt.step(grads={n: torch.randn(t.shape, generator=g) for n, t in params.items()})
            return params, opt, red
        return run_ranks(in_process(3, timeout_s=10), body)
    plain, kept, six = run(7, False), run(7, True), run(6, False)
    for (p1, _, _), (p2, _, _) in zip(plain, kept):
        assert all(torch.equal(p1[n], p2[n]) for n in p1), "the redundancy changed a bit"
    for _, opt, red in kept:
        red.commit(7)
    for r, (_, _, red) in enumerate(kept):
        rep = red.replica_at_commit()
        assert rep.step == 7 and _same_shard(rep.params, rep.state, kept[(r - 1) % 3][1])
    seven_again = run(7, True)  # update 7 never committed: each rank takes back the replica of update 6
    for (_, opt, red), (_, want, _) in zip(seven_again, six):
        red.rollback(6)
        assert _same_shard(opt.shard_params, opt.shard_state, want)
