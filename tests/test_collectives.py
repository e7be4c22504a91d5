"""Every collective against a NumPy reference, on 1-8 ranks in one process."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distopt.collectives import (
    CollectiveError, FlatBuffer, TorchCommunicator, allreduce_tensors, chunk_range, layout, run_ranks,
)

WORLD_SIZES = [1, 2, 3, 4, 8]
SIZES = [1, 7, 10, 1001]


def inputs(w: int, n: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * w + n)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(w)]


@pytest.mark.parametrize("w", WORLD_SIZES)
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_allreduce_matches_numpy(groups, w, op):
    for n in SIZES:
        xs = inputs(w, n)
        ref = np.sum([x.numpy().astype(np.float64) for x in xs], axis=0) / (w if op == "mean" else 1)
        outs = run_ranks(groups(w), lambda c: c.allreduce(xs[c.rank].clone(), op))
        for out in outs:
            np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(outs[0], o) for o in outs), "ranks disagree on the reduced bits"


@pytest.mark.parametrize("w", WORLD_SIZES)
def test_reduce_scatter_then_allgather_matches_numpy(groups, w):
    for n in SIZES:
        xs = inputs(w, n)
        ref = np.mean([x.numpy().astype(np.float64) for x in xs], axis=0)

        def body(c):
            shard = c.reduce_scatter(xs[c.rank].clone(), "mean")
            return shard, c.allgather(shard, numel=n)

        for r, (shard, full) in enumerate(run_ranks(groups(w), body)):
            start, end = chunk_range(n, w, r)
            np.testing.assert_allclose(shard.numpy(), ref[start:end], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(full.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("w", WORLD_SIZES)
def test_allgather_equal_shards_and_in_place(groups, w):
    shards = inputs(w, 5)

    def body(c):
        out = torch.zeros(5 * w)
        out[5 * c.rank:5 * (c.rank + 1)].copy_(shards[c.rank])
        c.allgather(out[5 * c.rank:5 * (c.rank + 1)], out=out)  # the shard is a view of out
        return c.allgather(shards[c.rank]), out

    ref = np.concatenate([s.numpy() for s in shards])
    for plain, in_place in run_ranks(groups(w), body):
        np.testing.assert_array_equal(plain.numpy(), ref)
        np.testing.assert_array_equal(in_place.numpy(), ref)


@pytest.mark.parametrize("w", WORLD_SIZES)
def test_broadcast_all_to_all_shift_barrier(groups, w):
    xs = inputs(w, 3 * w)
    src = w - 1

    def body(c):
        c.barrier()
        return c.broadcast(xs[c.rank].clone(), src=src), c.all_to_all(xs[c.rank]), c.shift(xs[c.rank])

    for r, (b, a2a, shifted) in enumerate(run_ranks(groups(w), body)):
        np.testing.assert_array_equal(b.numpy(), xs[src].numpy())
        np.testing.assert_array_equal(shifted.numpy(), xs[(r - 1) % w].numpy())
        ref = np.concatenate([xs[j].numpy()[3 * r:3 * (r + 1)] for j in range(w)])
        np.testing.assert_array_equal(a2a.numpy(), ref)


@pytest.mark.parametrize("w", WORLD_SIZES)
def test_shift_by_a_distance(groups, w):
    xs = inputs(w, 5)
    for d in range(1, w + 1):
        got = run_ranks(groups(w), lambda c: c.shift(xs[c.rank].clone(), distance=d))
        for r, shifted in enumerate(got):
            np.testing.assert_array_equal(shifted.numpy(), xs[(r - d) % w].numpy())
    with pytest.raises(ValueError, match="distance=0 must be an int >= 1"):  # before any communication
        groups(w)[0].shift(xs[0].clone(), distance=0)


@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_wire_compression_accumulates_wide(groups, w, wire):
    n = 1001
    xs = inputs(w, n)
    narrowed = [x.to(wire).to(torch.float64).numpy() for x in xs]

    def body(c):
        shard = c.reduce_scatter(xs[c.rank].clone(), "sum", wire_dtype=wire)
        return shard, c.allreduce(xs[c.rank].clone(), "mean", wire_dtype=wire)

    exact = np.sum(narrowed, axis=0)
    for r, (shard, full) in enumerate(run_ranks(groups(w), body)):
        start, end = chunk_range(n, w, r)
        # fp32 sums of the narrowed inputs: only fp32 rounding, not wire-dtype rounding
        np.testing.assert_allclose(shard.numpy(), exact[start:end], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(full.numpy(), np.mean([x.numpy() for x in xs], axis=0), rtol=2e-2, atol=2e-2)


def test_layout_packs_in_order_and_pads():
    lay = layout([3, 5, 10, 2, 0, 40], bucket_numel=12, pad_multiple=4)
    # [3, 5] | [10, 2, 0] | [40]: a tensor joins the open bucket while it fits in 12
    assert lay.offsets == (0, 3, 8, 18, 20, 20)
    assert lay.buckets == ((0, 8), (8, 20), (20, 60))
    assert lay.bucket_of == (0, 0, 1, 1, 1, 2)
    assert lay.members(1) == [2, 3, 4]
    assert lay.total == 60


def test_flat_buffer_views_share_storage(groups):
    shapes = [torch.Size([2, 3]), torch.Size([5]), torch.Size([1, 1, 4])]
    lay = layout([6, 5, 4], bucket_numel=8, pad_multiple=2)
    buf = FlatBuffer(shapes, lay, torch.float32, "cpu")
    src = [torch.full(s, float(i + 1)) for i, s in enumerate(shapes)]
    buf.copy_in(src)
    assert [v.shape for v in buf.views] == shapes
    assert all(v.data_ptr() >= buf.data.data_ptr() for v in buf.views)
    comms = groups(2)
    run_ranks(comms, lambda c: None)
    bufs = [FlatBuffer(shapes, lay, torch.float32, "cpu") for _ in comms]
    for r, b in enumerate(bufs):
        b.copy_in([t * (r + 1) for t in src])
    run_ranks(list(zip(comms, bufs)), lambda cb: cb[1].allreduce(cb[0], "sum"))
    for b in bufs:
        for v, t in zip(b.views, src):
            torch.testing.assert_close(v, t * 3)


@pytest.mark.parametrize("w", [1, 3])
def test_allreduce_tensors_many_small(groups, w):
    shapes = [(10,), (3, 7), (1,), (0,), (64, 2)] * 20
    per_rank = [[torch.randn(s, generator=torch.Generator().manual_seed(r * 1000 + i)) for i, s in enumerate(shapes)]
                for r in range(w)]
    refs = [sum(per_rank[r][i] for r in range(w)) / w for i in range(len(shapes))]
    run_ranks(groups(w), lambda c: allreduce_tensors(c, per_rank[c.rank], "mean", bucket_bytes=1024))
    for r in range(w):
        for t, ref in zip(per_rank[r], refs):
            torch.testing.assert_close(t, ref)


def test_bad_arguments_fail_before_any_communication(groups):
    c = groups(2)[0]
    with pytest.raises(ValueError, match="op='max' is not supported: use one of"):
        c.allreduce(torch.ones(3), "max")
    with pytest.raises(TypeError, match="op='mean' needs a floating-point tensor"):
        c.allreduce(torch.ones(3, dtype=torch.int64), "mean")
    with pytest.raises(ValueError, match="wire_dtype=torch.float64 is not supported"):
        c.allreduce(torch.ones(3), "sum", wire_dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a contiguous tensor"):
        c.allreduce(torch.ones(3, 4).t(), "sum")
    with pytest.raises(ValueError, match="takes a 1-D tensor"):
        c.reduce_scatter(torch.ones(3, 4))
    with pytest.raises(ValueError, match="src=5 is not a rank"):
        c.broadcast(torch.ones(3), src=5)
    with pytest.raises(ValueError, match="rank=2 must be an int in"):
        TorchCommunicator(2, 2)
    with pytest.raises(ValueError, match="backend='mpi' is not supported"):
        TorchCommunicator(0, 2, backend="mpi")
    assert not c._broken, "argument errors must not break the group"


def test_silent_peer_raises_within_timeout():
    import time
    from distopt.collectives import in_process
    comms = in_process(2, timeout_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(CollectiveError, match="allreduce failed on rank 0 of 2"):
        comms[0].allreduce(torch.ones(4))  # rank 1 never calls
    assert time.monotonic() - t0 < 6
    with pytest.raises(CollectiveError, match="close\\(\\) it and form a new communicator"):
        comms[0].allreduce(torch.ones(4))
    for c in comms:
        c.close()


@pytest.mark.parametrize("w", [1, 2, 3])
def test_async_collectives_overlap_and_complete_in_any_wait_order(groups, w):
    xs, ys = inputs(w, 101), inputs(w, 40)

    def body(c):
        a = c.reduce_scatter(xs[c.rank].clone(), "mean", async_op=True)
        b = c.allreduce(ys[c.rank].clone(), "sum", async_op=True)
        s = c.shift(ys[c.rank].clone(), async_op=True)
        return b.wait(), s.wait(), a.wait()

    ref_x = np.mean([x.numpy() for x in xs], axis=0)
    ref_y = np.sum([y.numpy() for y in ys], axis=0)
    for r, (summed, shifted, shard) in enumerate(run_ranks(groups(w), body)):
        start, end = chunk_range(101, w, r)
        np.testing.assert_allclose(shard.numpy(), ref_x[start:end], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(summed.numpy(), ref_y, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(shifted.numpy(), ys[(r - 1) % w].numpy())


def test_layout_keeps_units_together_and_caps_the_last_bucket():
    # an MLP's weights and biases: (w1, b1), (w2, b2), (w3, b3)
    numels, units = [40, 4, 160, 4, 40, 4], ["l1", "l1", "l2", "l2", "l3", "l3"]
    lay = layout(numels, bucket_numel=1000, units=units, last_bucket_numel=10)
    assert [lay.members(b) for b in range(len(lay.buckets))] == [[0, 1, 2, 3], [4, 5]]
    lay = layout(numels, bucket_numel=100, units=units)
    assert [lay.members(b) for b in range(len(lay.buckets))] == [[0, 1], [2, 3], [4, 5]]
    assert layout([], 10).buckets == ((0, 0),)


def test_always_group_at_world_one_runs_the_backend_and_equals_the_local_path():
    import torch.distributed as dist
    from collective_battery import battery
    grouped = TorchCommunicator(0, 1, backend="gloo", timeout_s=10, store=dist.HashStore(), always_group=True)
    local = TorchCommunicator(0, 1, backend="gloo")
    assert grouped._pg is not None and local._pg is None
    want, got = battery(local, "cpu"), battery(grouped, "cpu")
    for name in want:
        if "wire" in name:  # a real group narrows to the wire dtype even when alone
            torch.testing.assert_close(got[name], want[name], rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(got[name], want[name]), name
    grouped.close()
    with pytest.raises(CollectiveError, match="form a new communicator"):
        grouped.allreduce(torch.ones(3))


@pytest.mark.parametrize("w", [2, 3])
def test_battery_matches_the_per_collective_references(groups, w):
    # The battery is what the GPU tests compare against: check it on the CPU group first.
    from collective_battery import N, battery, rank_inputs
    xs = [rank_inputs(r, w).numpy().astype(np.float64) for r in range(w)]
    for r, res in enumerate(run_ranks(groups(w), lambda c: battery(c, "cpu"))):
        start, end = chunk_range(N, w, r)
        np.testing.assert_allclose(res["allreduce_sum"].numpy(), np.sum(xs, axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res["reduce_scatter"].numpy(), np.mean(xs, axis=0)[start:end], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["reduce_scatter_out"].numpy(), np.sum(xs, axis=0)[start:end], rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(res["allgather_numel"].numpy(), np.mean(xs, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(res["broadcast"].numpy(), xs[w - 1].astype(np.float32))
        np.testing.assert_array_equal(res["shift"].numpy(), xs[(r - 1) % w][:50].astype(np.float32))
        np.testing.assert_array_equal(res["shift_out"].numpy(), xs[(r - 1) % w][50:100].astype(np.float32))
        np.testing.assert_array_equal(res["async_shift"].numpy(), xs[(r - 1) % w][:40].astype(np.float32))
        assert torch.equal(res["async_all_to_all"], res["all_to_all"])
        narrowed = np.mean([x.astype(np.float32) for x in xs], axis=0)[start:end]
        np.testing.assert_allclose(res["async_reduce_scatter_bf16_wire"].numpy(), narrowed, rtol=2e-2, atol=2e-2)
