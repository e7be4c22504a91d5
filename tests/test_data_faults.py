"""Streams and shard files on Ray: a killed worker, a shrink and a grow, a dead loader process,
and Ray Data on the embedded cluster, each ending with the bits of the uninterrupted run."""
from __future__ import annotations

import pytest
import torch

import distopt
from grouped import grouped
from distopt.optim import adam
from distopt.runtime.faults import Fault
import data_task
from data_reference import iterable_stream, shards_stream, train
from trainer_task import make_model

STEPS, BATCH = 8, 12


def _fit(data, steps=STEPS, loss=data_task.loss, **kw):
    # A slow replacement start on a loaded machine is no shrink; a hung step fails in a minute.
    kw = {"num_workers": 2, "zero_stage": 1, "collective_timeout_s": 4, "replace_timeout_s": 60, "step_timeout_s": 60,
          **kw}
    trainer = distopt.Trainer(model=make_model, loss=loss, data=data, optimizer=adam(1e-2),
                              global_batch_size=BATCH, seed=0, **grouped(log_every=0, **kw))
    return trainer.fit(steps=steps)


def _same(a, b):
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict), "not the same bits"
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_cluster):
    folder = tmp_path_factory.mktemp("shards")
    paths = data_task.write_shards(folder)
    kinds = {"iterable": data_task.RowStream, "shards": lambda: distopt.data.shards(paths, data_task.read_npy, 8),
             "factory": lambda: data_task.make_stream}  # built on each worker, never pickled
    streams = {"iterable": iterable_stream(data_task.RowStream(), 3), "shards": shards_stream(paths, 8, 0, 3)}
    # The uninterrupted runs in-process: the same Worker and loader code, the same bits as on Ray.
    clean = {kind: _fit(kinds[kind](), ray_address="local") for kind in ("iterable", "shards")}
    return kinds, {**clean, "factory": clean["iterable"]}, streams


# Two kills a run, one per rank (a fault fires in a rank's first process only); every
# kind of data and loader count (0: read in the worker, 1 or 2 loader processes) is killed.
@pytest.mark.parametrize("kind,early,late,loaders", [("iterable", "data", "param_gather", 1),
                                                     ("shards", "compute", "grad_collective", 2),
                                                     ("factory", "shard_update", "data", 0)])
def test_sigkill_mid_run_gives_the_same_bits(data, kind, early, late, loaders):
    kinds, clean, _ = data
    faults = (Fault(rank=1, step=2, phase=early), Fault(rank=0, step=5, phase=late))
    result = _fit(kinds[kind](), faults=faults, num_data_workers=loaders)
    _same(result, clean[kind])
    assert [(f["rank"], f["step"], f["action"]) for f in result.failures] == [(1, 3, "replace"), (0, 6, "replace")]


def test_every_worker_lost_goes_back_to_the_checkpoint_and_its_read_position(data, tmp_path):
    kinds, clean, _ = data
    faults = (Fault(rank=0, step=5, phase="compute"), Fault(rank=1, step=5, phase="compute"))
    result = _fit(kinds["shards"](), faults=faults, max_failures=2, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    assert all("restart from checkpoint" in f["action"] for f in result.failures), result.failures
    _same(result, clean["shards"])


@pytest.mark.parametrize("kind", ["iterable", "shards"])
def test_a_shrink_and_a_grow_keep_the_order(data, kind):
    kinds, _, streams = data
    # The replacement dies while starting: the group shrinks to one worker, then grows back
    # once the freed bundle's new actor is up (slow steps give it the time).
    faults = (Fault(rank=1, step=3, phase="compute"), Fault(rank=1, step=3, phase="setup"))
    steps = 20
    result = _fit(kinds[kind](), steps=steps, loss=data_task.slow_loss, faults=faults)
    sizes = [h["world_size"] for h in result.history]
    assert sizes[:3] == [2, 2, 2] and 1 in sizes and sizes[-1] == 2, sizes
    weights, losses = train(streams[kind], steps, BATCH)  # the one-process oracle: same samples, same math
    for name, value in weights.items():
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close([h["loss"] for h in result.history], losses, rtol=1e-5, atol=1e-6)


def test_a_dead_loader_process_is_a_worker_failure_recovered_as_one(ray_cluster, tmp_path):
    clean = _fit(data_task.rows(), ray_address="local")
    result = _fit(data_task.DiesInLoader(str(tmp_path), at=40), num_data_workers=1)
    assert (tmp_path / "loader-died").exists()
    (failure,) = result.failures
    assert failure["cause"] == "process died" and failure["action"] == "replace"
    _same(result, clean)


def test_ray_data_on_the_embedded_cluster(ray_cluster):
    import ray
    rows = data_task.rows()
    ds = ray.data.from_items([{"row": r.numpy()} for r in rows])
    # Half a CPU per worker leaves one of the cluster's two CPUs to Ray Data's own tasks.
    result = _fit(ds, num_cpus_per_worker=0.5)
    stream = [rows[i % len(rows)] for i in range(STEPS * BATCH)]  # the dataset's order, every epoch
    weights, losses = train(stream, STEPS, BATCH)
    for name, value in weights.items():
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close([h["loss"] for h in result.history], losses, rtol=1e-5, atol=1e-6)
    killed = _fit(ds, num_cpus_per_worker=0.5, faults=(Fault(rank=1, step=4, phase="compute"),))
    _same(killed, result)
    assert [(f["rank"], f["step"], f["action"]) for f in killed.failures] == [(1, 5, "replace")]
