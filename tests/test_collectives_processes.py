"""The gloo backend across real processes: results, a peer that never joins, a peer that dies."""
from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest
import torch

from distopt.collectives import CollectiveError, TorchCommunicator, chunk_range, free_port

N = 1001


def _data(rank: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(rank))


def _collectives(rank: int, port: int, queue) -> None:
    comm = TorchCommunicator(rank, 2, "127.0.0.1", port, "gloo", timeout_s=20)
    summed = comm.allreduce(_data(rank).clone(), "sum")
    shard = comm.reduce_scatter(_data(rank).clone(), "mean")
    full = comm.allgather(shard, numel=N)
    queue.put((rank, summed.numpy(), shard.numpy(), full.numpy()))
    comm.barrier()
    comm.close()


def _dies_after_one_step(rank: int, port: int, queue) -> None:
    comm = TorchCommunicator(rank, 2, "127.0.0.1", port, "gloo", timeout_s=5)
    comm.allreduce(torch.ones(8))
    if rank == 1:
        os._exit(1)  # a crash: no clean shutdown, sockets closed by the kernel
    t0 = time.monotonic()
    try:
        comm.allreduce(torch.ones(8))
        queue.put(("no error", 0.0))
    except CollectiveError as e:
        queue.put((str(e), time.monotonic() - t0))


def _spawn(target, port):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    return procs, queue


def test_two_processes_match_numpy():
    procs, queue = _spawn(_collectives, free_port())
    results = dict((r, rest) for r, *rest in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    ref_sum = (_data(0) + _data(1)).numpy()
    for r, (summed, shard, full) in results.items():
        start, end = chunk_range(N, 2, r)
        np.testing.assert_allclose(summed, ref_sum, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(shard, ref_sum[start:end] / 2, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(full, ref_sum / 2, rtol=1e-6, atol=1e-6)


def test_dead_peer_raises_collective_error_quickly():
    procs, queue = _spawn(_dies_after_one_step, free_port())
    message, waited = queue.get(timeout=60)
    for p in procs:
        p.join(30)
    assert "allreduce failed on rank 0 of 2" in message
    assert waited < 5 + 3  # within the 5 s timeout (a closed socket usually fails at once)


def test_peer_that_never_joins_raises_within_timeout():
    t0 = time.monotonic()
    with pytest.raises(CollectiveError, match="could not form a gloo group of 2 .* within 2s"):
        TorchCommunicator(0, 2, "127.0.0.1", free_port(), "gloo", timeout_s=2)
    assert time.monotonic() - t0 < 2 + 5


def test_rank_that_arrives_before_rank_0_joins_as_soon_as_rank_0_listens():
    """A recovery's survivors roll back before rank 0 serves the store: the others must not
    sit out TCPStore's growing reconnect pauses (up to half a second each)."""
    import threading
    port, made, seen = free_port(), {}, {}

    def join(rank: int) -> None:
        made[rank] = TorchCommunicator(rank, 2, "127.0.0.1", port, "gloo", timeout_s=10)
        seen[rank] = time.monotonic()
    early = threading.Thread(target=join, args=(1,))
    early.start()
    time.sleep(0.3)  # rank 1 has been refused for a while
    started = time.monotonic()
    join(0)
    early.join(20)
    try:
        assert sorted(made) == [0, 1]
        assert seen[1] - started < 0.25, "rank 1 waited out a reconnect pause after rank 0 listened"
    finally:
        for c in made.values():
            c.close()


def test_rank_whose_rank_0_never_listens_raises_within_timeout():
    t0 = time.monotonic()
    with pytest.raises(CollectiveError, match="rank 1 could not form a gloo group of 2 .* within 2s: no store "
                                              "listened"):
        TorchCommunicator(1, 2, "127.0.0.1", free_port(), "gloo", timeout_s=2)
    assert time.monotonic() - t0 < 2 + 3
