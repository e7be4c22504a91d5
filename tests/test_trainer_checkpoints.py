"""Checkpoints through the Trainer: background writes, resume on 1-3 workers, damage refused."""
from __future__ import annotations


import pytest
import torch

import distopt
from distopt import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from distopt.checkpoint import CheckpointError, list_checkpoints, step_dir, verify
from distopt.optim import adam
from distopt.runtime.faults import Fault
from distopt.checkpoint import load_checkpoint
from distopt.collectives import run_ranks
from distopt.optim import ShardedOptimizer, StepHooks
from distopt.runtime.checkpointing import Coordinator, ShardWriter
from distopt.runtime.snapshots import Buffers, RunFields, snapshot
from distopt.runtime.writer_process import ProcessWriter
from odd_params import TiedModel
from trainer_task import loss, make_data, make_model

BATCH = 12  # divisible by 1, 2 and 3 workers


def _trainer(address="local", workers=2, zero_stage=1, faults=(), **checkpoint):
    """``checkpoint``: CheckpointConfig fields."""
    return distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2, weight_decay=0.01),
                           global_batch_size=BATCH, zero_stage=zero_stage, seed=0,
                           scaling=ScalingConfig(num_workers=workers, ray_address=address),
                           failure=FailureConfig(collective_timeout_s=5, faults=faults),
                           checkpoint=CheckpointConfig(**checkpoint), run=RunConfig(log_every=0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    result = _trainer(dir=root, every=4, keep_last=3).fit(steps=12)
    return root, result


def test_checkpoints_are_written_verified_and_pruned(saved, tmp_path):
    root, _ = saved
    assert list_checkpoints(root) == [step_dir(root, s) for s in (12, 8, 4)]
    for folder in list_checkpoints(root):
        manifest = verify(folder)
        assert manifest["world_size"] == 2 and manifest["next_step"] == int(folder.name.split("-")[1])
    more = tmp_path / "more"
    _trainer(dir=more, every=2, keep_last=2).fit(steps=8)
    assert list_checkpoints(more) == [step_dir(more, 8), step_dir(more, 6)]


def test_the_writer_process_writes_what_the_writer_thread_writes(saved, tmp_path, monkeypatch):
    """The worker's whole checkpoint path with the writer process a GPU rank uses (fed CPU
    copies here): memory reserved at set-up, write deadlines, records, manifests; every file
    equals the writer thread's byte for byte."""
    from distopt.runtime import worker as worker_module
    monkeypatch.setattr(worker_module, "make_writer",
                        lambda device, checkpointing: ProcessWriter() if checkpointing else ShardWriter())
    root, _ = saved
    _trainer(dir=tmp_path, every=4, keep_last=3).fit(steps=12)
    assert list_checkpoints(tmp_path) == [step_dir(tmp_path, s) for s in (12, 8, 4)]
    for step in (4, 8, 12):
        theirs, ours = step_dir(root, step), step_dir(tmp_path, step)
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
        for name in (p.name for p in theirs.iterdir()):
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), (step, name)


@pytest.mark.parametrize("workers,stage", [(1, 0), (2, 1), (3, 2)])
def test_resume_from_a_two_worker_checkpoint_on_any_world_size(saved, workers, stage):
    root, uninterrupted = saved
    resumed = _trainer(workers=workers, zero_stage=stage, resume_from=step_dir(root, 8)).fit(steps=12)
    assert [h["step"] for h in resumed.history] == [9, 10, 11, 12]
    for name, value in uninterrupted.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[name], value, rtol=1e-5, atol=1e-6)


def test_damaged_checkpoints_are_refused_and_skipped(saved, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(saved[0], root)
    shard = step_dir(root, 12) / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shard-00001.bin"):
        _trainer(resume_from=step_dir(root, 12)).fit(steps=12)
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint .*step-00000012"):
        resumed = _trainer(resume_from=root).fit(steps=12)  # falls back to step 8
    assert [h["step"] for h in resumed.history] == [9, 10, 11, 12]
    (step_dir(root, 8) / "shard-00000.bin").unlink()
    with pytest.raises(CheckpointError, match="shard-00000.bin"):
        _trainer(resume_from=step_dir(root, 8)).fit(steps=12)
    truncated = step_dir(root, 4) / "shard-00000.bin"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="shard-00000.bin is truncated"):
        _trainer(resume_from=step_dir(root, 4)).fit(steps=12)


def test_worker_killed_while_writing_a_checkpoint(ray_cluster, saved, tmp_path):
    _, clean = saved
    root = tmp_path / "killed"
    result = _trainer(address=None, dir=root, every=4,
                      faults=(Fault(rank=1, step=7, phase="checkpoint"),)).fit(steps=12)
    assert all(torch.equal(result.state_dict[k], clean.state_dict[k]) for k in clean.state_dict)
    assert [f["step"] for f in result.failures] == [8]
    assert list_checkpoints(root) == [step_dir(root, s) for s in (12, 8, 4)]
    for folder in list_checkpoints(root):
        verify(folder)


class _Freezes(StepHooks):
    """What the worker registers: a write still reading the shard in place lets go before it changes."""

    def __init__(self, writer) -> None:
        self.writer = writer

    def before_write(self) -> None:
        self.writer.freeze()


@pytest.mark.parametrize("writer_kind,live", [("thread", False), ("thread", True), ("process", False)],
                         ids=["copied", "read-in-place", "writer-process"])
def test_each_rank_writes_its_slice_of_the_weights_and_rank_0_the_buffers(tmp_path, groups, writer_kind, live):
    """The worker's checkpoint path without Ray: snapshots (copies into kept buffers, or the
    shard read in place while the next updates run), background writes by a thread or a
    writer process, the driver's manifest; the checkpoint holds the model's state dict at
    its step exactly."""
    root = str(tmp_path)

    def body(comm):
        model = TiedModel()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = ShardedOptimizer(params, adam(1e-2), comm, zero_stage=1, bucket_bytes=256)
        writer = ShardWriter() if writer_kind == "thread" else ProcessWriter()
        buffers, records, states = Buffers(), [], []
        opt.register_hooks(_Freezes(writer))
        for step in range(1, 8):
            idx = (torch.arange(8) + step + comm.rank) % 11
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(idx), (idx * 3) % 11).backward()
            opt.step()
            if step % 2 == 0:  # the later snapshots reuse the first one's memory once it is free
                shard, rest, fields, reader = snapshot(opt, model, comm.rank, 0, step, comm.rank == 0,
                                                       None if writer.busy() else buffers, live=live)
                assert sorted(shard) == ["exp_avg", "exp_avg_sq", "param"] and (reader is not None) == live
                assert (rest is None) == (comm.rank != 0) and "embed.weight" not in (rest or {})
                writer.start(root, step, comm.rank, shard, rest, fields, reader)
                if step == 4:  # the others are written while the next update runs
                    records += writer.drain(wait=True)
                states.append({k: v.clone() for k, v in model.state_dict().items()})
        records += writer.drain(wait=True)
        writer.close()
        return records, states
    out = run_ranks(groups(2), body)
    coordinator = Coordinator(root, keep_last=3)
    coordinator.add([r for records, _ in out for r in records])
    coordinator.finish(7)
    assert coordinator.written == [2, 4, 6]
    for step, expected in zip((2, 4, 6), out[0][1]):
        ckpt = load_checkpoint(step_dir(root, step))
        assert list(ckpt.model_state) == list(expected)
        assert all(torch.equal(ckpt.model_state[k], v) for k, v in expected.items()), step


def test_rank_0_fields_are_built_once_per_optimizer_and_match_fresh_ones(groups):
    """The manifest fields kept between checkpoints equal ones built anew at every step, and
    a new optimizer (a recovery builds one) or another seed builds them again."""
    from distopt.checkpoint import manifest_fields
    from distopt.optim import state_io
    (comm,) = groups(1)
    model = TiedModel()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kept = RunFields()

    def fresh(opt, seed, next_step):
        header = {**state_io.shard_header(opt), "state": state_io.state_fields(opt),
                  "param_groups": state_io.group_hyperparameters(opt)}
        return manifest_fields(header, dict(zip(opt.names, opt.tensors)), seed=seed, next_step=next_step,
                               model_state=model.state_dict())
    for rule in (adam(1e-2), adam(1e-3)):
        opt = ShardedOptimizer(params, rule, comm, zero_stage=1, bucket_bytes=256)
        for step in range(1, 4):
            idx = torch.arange(8) % 11
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(idx), idx).backward()
            opt.step()
            for seed in (0, 5):
                fields, loose = kept.get(opt, model, seed, step + 10)
                assert fields == fresh(opt, seed, step + 10)
                assert loose == [k for k, source in fields["model_keys"] if not source] and loose
        assert fields["rule"]["lr"] == rule.lr and fields["optimizer_step"] == 3
        shard, rest, fields, _ = snapshot(opt, model, 0, 5, 13, True, Buffers(), run_fields=kept)
        assert fields == fresh(opt, 5, 13) and sorted(rest) == sorted(loose)
        assert all(torch.equal(rest[k], model.state_dict()[k]) for k in loose)
        opt.close()  # as a recovery drops the optimizer it replaces: its gradient hooks go with it


def test_snapshot_copies_into_kept_memory_and_follows_new_sources():
    """Each copy holds the current values, in the memory kept from the last one, and
    sources elsewhere (a rebuilt optimizer's) are copied as well."""
    buffers = Buffers()
    parts = {"a": [torch.arange(5.0), torch.arange(3.0) + 10], "b": [torch.ones(4)]}
    first = buffers.copy(parts, torch.float32, torch.device("cpu"))
    assert all(torch.equal(first[k], torch.cat(ts)) for k, ts in parts.items())
    parts["a"][1].mul_(2)
    again = buffers.copy(parts, torch.float32, torch.device("cpu"))
    assert again["a"].data_ptr() == first["a"].data_ptr()
    assert torch.equal(again["a"], torch.tensor([0.0, 1, 2, 3, 4, 20, 22, 24]))
    moved = {"a": [torch.arange(5.0) - 1, torch.arange(3.0)], "b": [torch.zeros(4)]}
    third = buffers.copy(moved, torch.float32, torch.device("cpu"))
    assert all(torch.equal(third[k], torch.cat(ts)) for k, ts in moved.items())
