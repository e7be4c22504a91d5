"""A shard written from live memory: the bytes are those of the checkpoint step, whenever
the next update comes, and only what the writer has not read is copied."""
from __future__ import annotations

import os
import random
import threading
import time

import pytest
import torch

from distopt.checkpoint import read_tensors, write_tensors
from distopt.checkpoint.format import tensor_bytes
from distopt.runtime.live_shard import LiveShard

FLOAT = 4


def _fields(seed: int = 0) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # Uneven buckets, so pieces end inside tensors and at their ends.
    return {"exp_avg": [torch.randn(37, generator=g), torch.randn(100, generator=g)],
            "param": [torch.randn(64, generator=g), torch.randn(5, generator=g)]}


def _staging():
    made: dict[str, torch.Tensor] = {}

    def take(name: str, numel: int) -> torch.Tensor:
        made[name] = torch.full((numel,), float("nan"))
        return made[name]
    return take, made


def _flat(fields: dict[str, list[torch.Tensor]]) -> dict[str, bytes]:
    return {k: bytes(tensor_bytes(torch.cat(ts))) for k, ts in fields.items()}


def _read(live: LiveShard) -> dict[str, bytes]:
    return {k: b"".join(bytes(p) for p in f.pieces()) for k, f in live.tensors().items()}


def _change(fields: dict[str, list[torch.Tensor]]) -> None:
    for ts in fields.values():
        for t in ts:
            t.mul_(-3.0).add_(1.0)


def test_read_in_place_when_nothing_changes_copies_nothing():
    fields = _fields()
    expected = _flat(fields)
    take, staging = _staging()
    live = LiveShard(fields, take, piece_bytes=16 * FLOAT)
    assert _read(live) == expected
    live.freeze()
    assert live.copied_bytes == 0
    assert all(torch.isnan(t).all() for t in staging.values())  # the staging memory was never touched


def test_frozen_before_any_read_copies_all_and_later_changes_do_not_show():
    fields = _fields()
    expected = _flat(fields)
    take, _ = _staging()
    live = LiveShard(fields, take, piece_bytes=16 * FLOAT)
    live.freeze()
    _change(fields)
    assert _read(live) == expected
    assert live.copied_bytes == sum(len(b) for b in expected.values())


def test_frozen_midway_copies_only_the_unread_rest():
    fields = _fields()
    expected = _flat(fields)
    take, _ = _staging()
    live = LiveShard(fields, take, piece_bytes=16 * FLOAT)
    first = live.tensors()["exp_avg"].pieces()
    head = [bytes(next(first)) for _ in range(3)]  # 16 + 16 + 5: exp_avg's first bucket, 37 values
    live.freeze()
    _change(fields)
    got = b"".join(head) + b"".join(bytes(p) for p in first)
    assert got == expected["exp_avg"]
    assert b"".join(bytes(p) for p in live.tensors()["param"].pieces()) == expected["param"]
    # from the piece after the last one read: exp_avg's second bucket (100 values) and param (69)
    assert live.copied_bytes == (100 + 69) * FLOAT


def test_a_writer_thread_racing_the_updates_always_writes_the_checkpoint_steps_bytes():
    rng = random.Random(0)
    for trial in range(60):
        fields = _fields(trial)
        expected = _flat(fields)
        take, _ = _staging()
        live = LiveShard(fields, take, piece_bytes=rng.choice([4, 8, 32]) * FLOAT)
        out: dict[str, bytes] = {}
        writer = threading.Thread(target=lambda: out.update(_read(live)))
        writer.start()
        time.sleep(rng.random() * 2e-4)
        live.freeze()
        for _ in range(20):  # keep changing the memory while the writer may still be in it
            _change(fields)
        writer.join()
        assert out == expected, trial


def test_an_update_that_lands_in_the_middle_of_a_piece_read_is_caught():
    fields = _fields()
    expected = _flat(fields)

    class Interrupted(LiveShard):
        reads = 0

        def _load(self, bounce, live):
            half = live.numel() // 2
            bounce[:half].copy_(live[:half])
            self.reads += 1
            if self.reads == 4:  # the trainer freezes and updates while this piece is half read
                self.freeze()
                _change(fields)
            bounce[half:].copy_(live[half:])

    live = Interrupted(fields, _staging()[0], piece_bytes=16 * FLOAT)
    assert _read(live) == expected
    assert live.reads == 4  # the pieces from the interrupted one on came from the copies


def test_a_failed_freeze_abandons_the_write_instead_of_writing_staging_garbage(tmp_path):
    fields = _fields()
    live = LiveShard(fields, lambda name, numel: torch.empty(numel - 1), piece_bytes=16 * FLOAT)  # too short
    first = live.tensors()["exp_avg"].pieces()
    next(first)
    with pytest.raises(RuntimeError):
        live.freeze()
    with pytest.raises(RuntimeError, match="failed .*RuntimeError.*abandoned"):
        next(first)


def test_a_failed_copy_fails_its_checkpoint_write_not_the_training_step(tmp_path):
    from distopt.runtime.checkpointing import ShardWriter
    fields = _fields()
    writer = ShardWriter()
    gate = threading.Event()

    class Held(LiveShard):  # the writer is still at its first piece when the update comes
        def _load(self, bounce, live):
            gate.wait()
            super()._load(bounce, live)

    live = Held(fields, lambda name, numel: torch.empty(numel - 1), piece_bytes=16 * FLOAT)
    writer.start(str(tmp_path), 1, 0, live.tensors(), None, None, live)
    writer.freeze()  # the copy fails; the update may go on
    gate.set()
    (record,) = writer.drain(wait=True)
    writer.close()
    assert "abandoned" in record["error"] and "shard" not in record


def test_fields_read_out_of_order_are_refused():
    live = LiveShard(_fields(), _staging()[0], piece_bytes=16 * FLOAT)
    with pytest.raises(RuntimeError, match="in the order"):
        next(live.tensors()["param"].pieces())


def test_gpu_or_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype"):
        LiveShard({"a": [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]}, _staging()[0])


def test_a_live_field_writes_the_same_file_as_the_tensor(tmp_path):
    fields = _fields()
    plain = write_tensors(tmp_path, "plain.bin", {k: torch.cat(ts) for k, ts in fields.items()})
    live = LiveShard(fields, _staging()[0], piece_bytes=16 * FLOAT)
    pieces = write_tensors(tmp_path, "live.bin", live.tensors())
    assert {**pieces, "file": "plain.bin"} == plain
    assert (tmp_path / "plain.bin").read_bytes() == (tmp_path / "live.bin").read_bytes()
    back = read_tensors(tmp_path, pieces)
    assert all(torch.equal(back[k], torch.cat(ts)) for k, ts in fields.items())


def test_pieces_of_the_wrong_length_are_refused_and_leave_no_file(tmp_path):
    class Short:
        dtype, shape = torch.float32, (10,)

        def pieces(self):
            yield memoryview(bytes(9 * FLOAT))

    with pytest.raises(ValueError, match="gave 36 bytes"):
        write_tensors(tmp_path, "short.bin", {"x": Short()})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("replicate", [False, True])
def test_the_optimizer_calls_before_write_before_each_in_place_change(groups, replicate):
    """The hook a live checkpoint relies on: it runs before an update, a rollback and a load
    change the shard, and sees the shard as it was."""
    from distopt.collectives import run_ranks
    from distopt.ft import Redundancy
    from distopt.optim import ShardedOptimizer, StepHooks, adam

    def body(comm):
        params = [torch.nn.Parameter(torch.randn(40, generator=torch.Generator().manual_seed(i))) for i in range(3)]
        opt = ShardedOptimizer(params, adam(1e-2), comm, zero_stage=1, bucket_bytes=64)
        red = Redundancy(opt) if replicate else None
        seen: list[tuple[str, torch.Tensor]] = []
        shard = lambda: torch.cat([*opt.shard_params, *[t for f in opt.shard_state.values() for t in f]])  # noqa: E731

        class Writer(StepHooks):  # what a live checkpoint registers
            def before_write(self) -> None:
                seen.append(("hook", shard().clone()))
        opt.register_hooks(Writer())
        for step in range(3):
            if red is not None:
                red.commit(opt.step_count)
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (step + 1 + comm.rank))
            before = shard().clone()
            opt.step()
            assert torch.equal(seen[-1][1], before) and not torch.equal(shard(), before)
        assert len(seen) == 3
        full = opt.full_state_dict()
        opt.load_full_state_dict(full)
        assert len(seen) == 4
        if replicate:  # (the load rebuilt the redundancy on its hook)
            red.rollback(opt.step_count)
            assert len(seen) == 5
        return True
    assert run_ranks(groups(2), body) == [True, True]
