"""Streams and shard files through the Trainer: the documented order, resumed and recovered
at exactly the next sample on any worker count."""
from __future__ import annotations

import pytest
import torch

import distopt
from grouped import grouped
from distopt.checkpoint import load_checkpoint, step_dir
from distopt.optim import adam
import data_task
from trainer_task import make_model
from data_reference import iterable_stream, shards_stream, train

STEPS, BATCH = 10, 12  # 90 samples: epochs end mid-batch


def _fit(data, steps=STEPS, address="local", **kw):
    kw = {"num_workers": 2, "zero_stage": 1, **kw}
    trainer = distopt.Trainer(model=make_model,
                              loss=data_task.loss, data=data, optimizer=adam(1e-2), global_batch_size=BATCH,
                              seed=0, **grouped(log_every=0, ray_address=address, collective_timeout_s=10, **kw))
    return trainer.fit(steps=steps)


def _close(result, expected_weights, expected_losses):
    for name, value in expected_weights.items():
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([h["loss"] for h in result.history]),
                               torch.tensor(expected_losses[-len(result.history):]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def shard_paths(tmp_path_factory):
    return data_task.write_shards(tmp_path_factory.mktemp("shards"))


def _shards(paths, read=data_task.read_npy, buffer=8):
    return distopt.data.shards(paths, read, shuffle_buffer=buffer)


@pytest.mark.parametrize("data", ["iterable", "factory"])
@pytest.mark.parametrize("workers,accumulation", [(1, 1), (2, 3)])
def test_iterable_dataset_equals_the_documented_stream(data, workers, accumulation):
    stream = iterable_stream(data_task.RowStream(), epochs=2)
    result = _fit(data_task.RowStream() if data == "iterable" else data_task.make_stream, num_workers=workers,
                  gradient_accumulation_steps=accumulation)
    _close(result, *train(stream, STEPS, BATCH))
    # The ids show the samples: step k took exactly the stream's k-th global batch.
    assert [h["ids"] * workers * accumulation for h in result.history] == \
        pytest.approx([float(sum(r[8] for r in stream[k * BATCH:(k + 1) * BATCH])) for k in range(STEPS)])


@pytest.mark.parametrize("read", [data_task.read_npy, data_task.read_npy_rows])
@pytest.mark.parametrize("workers", [1, 3])
def test_shards_equal_the_documented_order(shard_paths, read, workers):
    result = _fit(_shards(shard_paths, read), num_workers=workers)
    _close(result, *train(shards_stream(shard_paths, 8, 0, epochs=2), STEPS, BATCH))


def test_background_loading_gives_the_same_bits(shard_paths):
    for data in (lambda: _shards(shard_paths), data_task.RowStream):
        plain = _fit(data())
        loaded = _fit(data(), num_data_workers=2, prefetch=3)
        assert all(torch.equal(plain.state_dict[k], loaded.state_dict[k]) for k in plain.state_dict)
        assert [h["loss"] for h in plain.history] == [h["loss"] for h in loaded.history]
        assert all(h["data_s"] >= 0 for h in loaded.history)


@pytest.mark.parametrize("kind", ["iterable", "shards"])
def test_a_two_worker_checkpoint_resumes_on_one_and_three_workers_at_the_next_sample(kind, shard_paths, tmp_path):
    data = (lambda: data_task.RowStream()) if kind == "iterable" else (lambda: _shards(shard_paths))
    expected = _fit(data())
    _fit(data(), steps=6, checkpoint_dir=tmp_path, checkpoint_every=3)
    position = load_checkpoint(step_dir(tmp_path, 6)).manifest["data_position"]
    assert position == {"epoch": 0, "shard": 0, "offset": 72} if kind == "iterable" else position["epoch"] == 0
    for workers in (1, 3):
        resumed = _fit(data(), num_workers=workers, resume_from=step_dir(tmp_path, 3))
        assert [h["step"] for h in resumed.history] == list(range(4, STEPS + 1))
        _close(resumed, expected.state_dict, [h["loss"] for h in expected.history])


def test_a_factory_of_a_map_style_dataset_gives_the_datasets_bits():
    direct, built = _fit(data_task.rows()), _fit(data_task.make_rows)
    assert all(torch.equal(direct.state_dict[k], built.state_dict[k]) for k in direct.state_dict)
    assert [h["loss"] for h in direct.history] == [h["loss"] for h in built.history]


def test_a_map_style_checkpoint_does_not_resume_a_stream(tmp_path):
    _fit(data_task.rows(), steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="holds no read position"):
        _fit(data_task.RowStream(), resume_from=step_dir(tmp_path, 2))
    _fit(data_task.RowStream(), steps=2, checkpoint_dir=tmp_path / "stream")
    with pytest.raises(ValueError, match="written by a run reading a stream"):
        _fit(data_task.rows(), resume_from=step_dir(tmp_path / "stream", 2))
