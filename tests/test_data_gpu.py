"""Streams and shards feeding GPU workers: background loading pins its batches, copies them
without blocking, and gives the bits of loading on the training thread.

Skipped without a CUDA device; needs no Ray (the workers are threads sharing the GPU).
"""
from __future__ import annotations

import pytest
import torch

import distopt
from grouped import grouped
from distopt.data import Feed
from distopt.optim import adam
import data_task
from data_reference import iterable_stream, shards_stream, train
from trainer_task import make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS, BATCH = 10, 12


def _fit(data, loaders):
    return distopt.Trainer(model=make_model, loss=data_task.loss, data=data, optimizer=adam(1e-2),
                           global_batch_size=BATCH, num_data_workers=loaders,
                           **grouped(num_workers=2, use_gpu=True, log_every=0, ray_address="local")).fit(steps=STEPS)


@pytest.mark.parametrize("kind", ["iterable", "shards"])
def test_gpu_workers_read_the_documented_order_with_and_without_loader_processes(kind, tmp_path):
    paths = data_task.write_shards(tmp_path)
    make = data_task.RowStream if kind == "iterable" else lambda: distopt.data.shards(paths, data_task.read_npy, 8)
    stream = iterable_stream(data_task.RowStream(), 2) if kind == "iterable" else shards_stream(paths, 8, 0, 2)
    plain, loaded = _fit(make(), 0), _fit(make(), 2)
    assert all(torch.equal(plain.state_dict[k], loaded.state_dict[k]) for k in plain.state_dict)
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in loaded.history]
    weights, losses = train(stream, STEPS, BATCH)
    for name, value in weights.items():
        torch.testing.assert_close(loaded.state_dict[name], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close([h["loss"] for h in loaded.history], losses, rtol=1e-4, atol=1e-5)


def test_loader_processes_hand_over_pinned_batches():
    feed = Feed(data_task.rows(), 0, BATCH, 1, torch.device("cuda", 0), num_data_workers=1, prefetch=2)
    try:
        (host,), _ = feed._loader.get(0, None, 0, 1)
        assert host.is_pinned()
        (on_gpu,), _, wait_s = feed.batches(1, None, 0, 1)
        assert on_gpu.is_cuda and wait_s >= 0
    finally:
        feed.close()
