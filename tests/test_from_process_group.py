"""TorchCommunicator.from_process_group on torch's default group, formed the way torchrun forms it."""
from __future__ import annotations

import os
import queue as queue_module
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from collective_battery import N, battery, rank_inputs

from distopt.collectives import CollectiveError, TorchCommunicator, chunk_range, free_port, run_ranks

WORLD = 2


def _wrapped_rank(rank: int, port: int, results) -> None:
    # torchrun's environment, then the user's own init_process_group
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    comm = TorchCommunicator.from_process_group()
    seen = {"rank": comm.rank, "world_size": comm.world_size, "backend": comm.backend,
            "timeout_s": comm.timeout_s, "has_store": comm.store is not None}
    out = {name: t.numpy() for name, t in battery(comm, "cpu").items()}  # tensors would cross as fds
    comm.close()
    try:
        comm.allreduce(torch.ones(3))
        seen["after_close"] = "no error"
    except CollectiveError as e:
        seen["after_close"] = str(e)
    seen["initialised_after_close"] = dist.is_initialized()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)  # the user's default group outlives the communicator
    seen["default_group_sum"] = t.item()
    results.put((rank, seen, out))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def wrapped():
    """Each rank's (facts, battery results) from a default group of 2 processes."""
    results = mp.get_context("spawn").Queue()
    ranks = mp.spawn(_wrapped_rank, args=(free_port(), results), nprocs=WORLD, join=False)
    got, deadline = {}, time.monotonic() + 60
    while len(got) < WORLD:
        try:
            rank, seen, out = results.get(timeout=0.5)
            got[rank] = (seen, out)
        except queue_module.Empty:
            ranks.join(timeout=0)  # re-raises a rank's exception with its traceback
            assert time.monotonic() < deadline, "the ranks did not report within 60 s"
    while not ranks.join(timeout=5):  # True once every rank has exited (one at a time)
        assert time.monotonic() < deadline + 30, "the ranks did not exit"
    return got


def test_wraps_the_default_group_with_its_rank_size_and_timeout(wrapped):
    for r, (seen, _) in wrapped.items():
        assert (seen["rank"], seen["world_size"], seen["backend"]) == (r, WORLD, "gloo")
        assert seen["timeout_s"] == 30.0  # the timeout given to init_process_group
        assert seen["has_store"]  # torch's default store


def test_collectives_on_the_default_group_match_numpy(wrapped):
    xs = [rank_inputs(r, WORLD).numpy().astype(np.float64) for r in range(WORLD)]
    total = np.sum(xs, axis=0)
    for r, (_, res) in wrapped.items():
        start, end = chunk_range(N, WORLD, r)
        np.testing.assert_allclose(res["allreduce_sum"], total, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res["allreduce_mean"], total / WORLD, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["reduce_scatter"], total[start:end] / WORLD, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["allgather_numel"], total / WORLD, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(res["broadcast"], xs[WORLD - 1].astype(np.float32))
        np.testing.assert_allclose(res["allreduce_bf16_wire"], total / WORLD, rtol=2e-2, atol=2e-2)


def test_default_group_gives_the_bits_of_a_group_the_class_forms(wrapped, groups):
    # Same code path, same backend: every collective, wire compression and async ones included.
    own = run_ranks(groups(WORLD), lambda c: battery(c, "cpu"))
    for r, (_, res) in wrapped.items():
        assert res.keys() == own[r].keys()
        for name in res:
            np.testing.assert_array_equal(res[name], own[r][name].numpy(), err_msg=f"rank {r}: {name}")


def test_close_leaves_the_default_group_to_its_owner(wrapped):
    for seen, _ in wrapped.values():
        assert "form a new communicator" in seen["after_close"]  # the communicator is closed
        assert seen["initialised_after_close"]
        assert seen["default_group_sum"] == 1.0 + 2.0  # and the group still reduces


def test_uninitialised_default_group_names_init_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"torch\.distributed\.init_process_group"):
        TorchCommunicator.from_process_group()
