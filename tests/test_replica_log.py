"""The undo across hosts on CPU: copies of a rank's own shard, a chunk per step, and a log
of its gradients, from which the shard at the last commit is rebuilt."""
from __future__ import annotations

import pytest
import torch

from distopt.collectives import in_process, run_ranks
from distopt.ft import RecoveryError, Redundancy
from distopt.ft.replica_log import ALIGN, chunk_pieces
from distopt.optim import ShardedOptimizer, adam, muon, sgd

from odd_params import init_params as _init, run_committed, same_shard as _same_shard


@pytest.fixture(autouse=True)
def across_hosts(monkeypatch):
    """No shared memory: the path between hosts, where a rank undoes its update by itself."""
    monkeypatch.setenv("DISTOPT_SHM", "0")


def _run(world, steps, depth, rule=lambda: adam(1e-2, weight_decay=0.05), replicate=True, clip=None, stage=1):
    """Each rank's parameters, optimizer and redundancy (None without ``replicate``) after
    ``steps`` steps, each but the last committed (as the worker commits before a step)."""
    return run_committed(world, steps, rule, stage, clip, (lambda opt: Redundancy(opt, log_depth=depth)) if replicate else None)


@pytest.mark.parametrize("sizes,depth", [([1000], 4), ([130, 7, 4096, 64], 3), ([10, 20], 8), ([5000], 1)])
def test_chunks_cover_the_shard_once_with_aligned_cuts(sizes, depth):
    chunks = chunk_pieces(sizes, depth)
    assert len(chunks) == depth
    seen = [torch.zeros(n, dtype=torch.int64) for n in sizes]
    for chunk in chunks:
        for b, lo, hi in chunk:
            assert lo < hi and (lo % ALIGN == 0) and (hi % ALIGN == 0 or hi == sizes[b])
            seen[b][lo:hi] += 1
    assert all(bool((s == 1).all()) for s in seen)


@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("rule", ["adamw_clipped", "sgd_momentum"])
def test_own_shard_rebuilt_from_copies_and_log_equals_the_commit(depth, rule):
    make = {"adamw_clipped": lambda: adam(1e-2, weight_decay=0.05, decoupled=True),
            "sgd_momentum": lambda: sgd(0.05, momentum=0.9, weight_decay=0.01)}[rule]
    nine = _run(3, 9, depth, make, replicate=False, clip=0.01)
    kept = _run(3, 10, depth, make, clip=0.01)  # update 10 never committed
    for (_, want, _), (_, opt, red) in zip(nine, kept):
        assert not red.shared and red.own_log is not None and red.snapshot is None
        red.rollback(9)
        assert _same_shard(opt.shard_params, opt.shard_state, want)


def test_a_copy_cut_short_leaves_every_chunk_whole():
    """A copy goes to the spare slot and the table moves only after it: garbage in the spare
    slot (what a copy cut short leaves) never reaches a rebuilt shard."""
    kept, five = _run(2, 6, 3), _run(2, 5, 3, replicate=False)
    for (_, opt, red), (_, want, _) in zip(kept, five):
        log = red.own_log
        log.settle()  # (the copy of update 6, made ahead, is dropped: 6 has not committed)
        for flat in log.own.chunks[log._spare]:
            flat.fill_(float("nan"))
        red.rollback(5)
        assert _same_shard(opt.shard_params, opt.shard_state, want)


def test_the_next_chunk_is_copied_ahead_and_pointed_at_once_its_update_committed():
    """A rank starts copying update 5's chunk in the background as soon as its gather is
    done; the table moves to that copy only once update 5 has committed and the copy is done."""
    kept = _run(2, 5, 4)
    for _, opt, red in kept:
        log = red.own_log
        assert log._ahead is not None and log._ahead[0] == 5
        before = int(log.own.table[1])
        assert before // 1024 == 1  # chunk 1's copy is still update 1's
        red.commit(5)  # as the worker does before the next step: the copy may still run
        assert int(log.own.table[1]) == before
        red.settle()  # as the next step does before its gradient-norm allreduce
        assert int(log.own.table[1]) // 1024 == 5 and log._ahead is None
        live = [t.clone() for t in opt.shard_params]
        log.undo(5)  # rebuilt from the copies (one of them update 5's) and the log
        assert all(torch.equal(a, b) for a, b in zip(live, opt.shard_params))


def test_a_copy_ahead_of_an_update_that_never_committed_is_dropped():
    """Update 5 is undone everywhere: its chunk's copy, made ahead, never becomes the chunk's
    copy, and the shards rebuild update 4 from the older copies and the log."""
    kept, four = _run(2, 5, 4), _run(2, 4, 4)
    for _, _, red in kept:
        red.rollback(4)
    for r, (_, opt, red) in enumerate(kept):
        log = red.own_log
        assert log._ahead is None and int(log.own.table[1]) // 1024 == 1
        assert _same_shard(opt.shard_params, opt.shard_state, four[r][1])


def test_a_chunk_copied_past_the_commit_is_refused():
    _, _, red = _run(2, 3, 4)[0]
    table = red.own_log.own.table
    table[0] = 9 * 1024 + int(table[0]) % 1024
    with pytest.raises(RecoveryError, match="chunk 0 was copied at update 9, past the commit 2"):
        red.rollback(2)


def test_a_chunk_the_rank_was_resetting_is_refused():
    _, _, red = _run(2, 3, 4)[0]
    red.own_log.own.table[2] = -1  # what a rank stopped in the middle of a reset leaves
    with pytest.raises(RecoveryError, match="chunk 2 has no complete copy"):
        red.rollback(2)


def test_a_step_no_longer_logged_is_refused():
    _, _, red = _run(2, 3, 4)[0]
    red.own_log.own.steps[1 % 5] = -1  # update 1's slot reused: a chunk copied at 0 needs it
    with pytest.raises(RecoveryError, match="gradients of update 1 are no longer logged"):
        red.rollback(2)


@pytest.mark.parametrize("bad", [0, -1, 65, 2.0, True])
def test_bad_log_depth_is_refused_before_any_communication(bad):
    comm = in_process(1)[0]
    opt = ShardedOptimizer(_init(), adam(1e-3), comm)
    with pytest.raises(ValueError, match=r"replica_log_depth=.* must be an int in \[1, 64\]"):
        Redundancy(opt, log_depth=bad)


def _hybrid_params():
    g = torch.Generator().manual_seed(1)
    shapes = {"m0": (9, 7), "m1": (7, 9), "m2": (16, 5), "m3": (5, 16), "m4": (12, 12), "v0": (13,), "v1": (101,)}
    return {n: torch.randn(s, generator=g).requires_grad_() for n, s in shapes.items()}


def _hybrid_run(world, steps, depth, replicate):
    def body(comm):
        params = _hybrid_params()
        groups = [{"params": {n: t for n, t in params.items() if t.ndim == 2}, "rule": muon(0.02)},
                  {"params": {n: t for n, t in params.items() if t.ndim == 1}}]
        opt = ShardedOptimizer(groups, adam(1e-2, weight_decay=0.05, decoupled=True), comm, zero_stage=1,
                               bucket_bytes=768, max_grad_norm=0.5)
        red = Redundancy(opt, log_depth=depth) if replicate else None
        for k in range(steps):
            if red is not None:
                red.commit(opt.step_count)
            g = torch.Generator().manual_seed(100 * k + comm.rank)
            opt.step(grads={n: torch.randn(t.shape, generator=g) for n, t in params.items()})
        return params, opt, red
    return run_ranks(in_process(world, timeout_s=10), body)


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_muon_matrices_are_copied_and_replayed_whole_to_the_owners_bits(depth):
    plain, kept = _hybrid_run(3, 7, depth, False), _hybrid_run(3, 7, depth, True)
    for (p1, _, _), (p2, opt, red) in zip(plain, kept):
        assert all(torch.equal(p1[n], p2[n]) for n in p1), "the redundancy changed a bit"
        cuts = [opt.rules.cuts(b) for b in range(len(opt.shard_params))]
        for chunk in red.own_log.chunks:  # a chunk never cuts a matrix
            assert all(cuts[b] is None or (lo in cuts[b] and hi in cuts[b]) for b, lo, hi in chunk)
    six = _hybrid_run(3, 6, depth, False)
    for (_, opt, red), (_, want, _) in zip(kept, six):
        red.rollback(6)
        assert _same_shard(opt.shard_params, opt.shard_state, want)
