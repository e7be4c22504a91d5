"""The data layer without Ray: the shuffle buffer, what a worker reads, and every bad input
failing with an error that names the sample or the shard."""
from __future__ import annotations

import pytest
import torch

import distopt
from grouped import grouped
from distopt.data import Feed, kind_of, record_order, shards
from distopt.data.sources import ShardSource
from distopt.optim import adam
from distopt.runtime.errors import WorkerError
import data_task
from trainer_task import make_model

BATCH = 12


def _fit(data, steps=4, **kw):
    kw = {"num_workers": 2, **kw}
    return distopt.Trainer(model=make_model, loss=data_task.loss, data=data, optimizer=adam(1e-2),
                           global_batch_size=BATCH,
                           # a rank that raised leaves its peer in a collective until this timeout
                           **grouped(log_every=0, ray_address="local", collective_timeout_s=5, **kw)).fit(steps=steps)


@pytest.fixture
def paths(tmp_path):
    return data_task.write_shards(tmp_path)


@pytest.mark.parametrize("n,buffer", [(0, 4), (1, 4), (5, 1), (7, 7), (50, 8), (50, 100)])
def test_record_order_is_a_permutation_and_a_buffer_of_one_keeps_the_readers_order(n, buffer):
    order = record_order(n, buffer, seed=3, epoch=1, shard=2)
    assert sorted(order) == list(range(n))
    assert order == record_order(n, buffer, seed=3, epoch=1, shard=2)
    if buffer == 1:
        assert order == list(range(n))
    if n > 8 and buffer < n:  # other epochs and shards are shuffled otherwise
        assert order != record_order(n, buffer, seed=3, epoch=2, shard=2) != record_order(n, buffer, 3, 1, 3)


def test_each_rank_reads_only_its_own_records(paths):
    data = shards(paths, data_task.read_counting, shuffle_buffer=4)
    per_rank = []
    for rank in range(3):
        data_task.READS.clear()
        source = ShardSource(data, seed=0, global_batch_size=BATCH, accumulation_steps=1)
        (batch,), after = source.batches(0, None, rank, 3)
        per_rank.append(list(data_task.READS))
        assert len(data_task.READS) == BATCH // 3  # four records, not the twelve of the step
        assert len(batch) == 4
    assert len({r for reads in per_rank for r in reads}) == BATCH  # together, the step's twelve


def test_the_global_order_does_not_depend_on_the_worker_count(paths):
    data = shards(paths, data_task.read_npy, shuffle_buffer=4)
    by_world = {}
    for world in (1, 2, 3, 4):
        feeds = [Feed(data, 0, BATCH, 1, torch.device("cpu")) for _ in range(world)]
        ids, position = [], None
        for step in range(9):  # 108 samples of 90 a epoch: across an epoch's end
            parts = [f.batches(step, position, r, world) for r, f in enumerate(feeds)]
            assert len({repr(p[1]) for p in parts}) == 1
            ids += [int(i) for p in parts for i in p[0][0][:, 8]]
            position = parts[0][1]
        by_world[world] = ids
    assert by_world[1] == by_world[2] == by_world[3] == by_world[4]
    assert sorted(by_world[1][:90]) == list(range(90))  # epoch 0 is every sample once


def test_a_stream_shorter_than_one_global_batch_names_the_epoch():
    with pytest.raises(WorkerError, match="epoch 0 of the stream yielded 10 samples, fewer than one global batch"):
        _fit(data_task.make_short_stream)


def test_shards_with_fewer_samples_than_one_global_batch(tmp_path):
    with pytest.raises(WorkerError, match="hold 7 samples in all, fewer than one global batch of 12"):
        _fit(shards(data_task.write_shards(tmp_path, (3, 4)), data_task.read_npy))


@pytest.mark.parametrize("loaders", [0, 1])
def test_a_reader_that_raises_names_the_shard_and_record(paths, loaders):
    with pytest.raises(WorkerError, match=r"shard '.*shard-00\d.npy' record 5: the reader raised OSError: disk error"):
        _fit(shards(paths, data_task.read_fails_at_5), num_data_workers=loaders)


def test_a_sample_of_another_structure_names_the_shard_and_record(paths):
    with pytest.raises(WorkerError, match=r"shard '.*shard-00\d.npy' record 3 has structure .* the first sample had"):
        _fit(shards(paths, data_task.read_changes_at_3, shuffle_buffer=1))
    with pytest.raises(WorkerError, match="sample 7 of epoch 0 has structure"):
        _fit(data_task.ChangesShape())


def test_missing_and_truncated_shards_are_named(paths, tmp_path):
    with pytest.raises(FileNotFoundError, match="shard '.*nope.npy' does not exist"):
        shards([*paths, str(tmp_path / "nope.npy")], data_task.read_npy)
    data = shards(paths, data_task.read_npy)
    with open(paths[2], "r+b") as f:  # cut the 31-row shard short
        f.truncate(200)
    with pytest.raises(WorkerError, match=r"shard '.*shard-002.npy': read\(.*\) raised ValueError.*truncated"):
        _fit(data, steps=8)
    import os
    os.remove(paths[3])
    with pytest.raises(WorkerError, match=r"shard '.*shard-003.npy' is missing"):
        _fit(data, steps=8)


@pytest.mark.parametrize("kw,message", [
    ({"num_data_workers": -1}, "num_data_workers=-1 must be an int >= 0"),
    ({"prefetch": 0}, "prefetch=0 must be an int >= 1"),
])
def test_bad_loader_settings_fail_at_construction(kw, message):
    with pytest.raises(ValueError, match=message):
        distopt.Trainer(model=make_model, loss=data_task.loss, data=data_task.RowStream(), optimizer=adam(1e-2),
                        global_batch_size=BATCH, **kw)


def test_what_data_accepts():
    assert kind_of(data_task.rows()) == "map"
    assert kind_of(data_task.RowStream()) == "iterable"
    assert kind_of(data_task.make_stream) == kind_of(data_task.RowStream) == "factory"
    with pytest.raises(TypeError, match="not a module-level one"):
        kind_of(lambda: data_task.RowStream())
    with pytest.raises(TypeError, match="data must be a map-style dataset"):
        kind_of(5)
    with pytest.raises(TypeError, match=r"factory not_a_dataset\(\) returned int"):
        Feed(data_task.not_a_dataset, 0, BATCH, 1, torch.device("cpu"))
