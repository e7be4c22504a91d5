"""The checkpoint writer process: the same files as the writer thread, shared memory kept and
grown, a lost process fails its writes without a hang, and it never outlives training. A GPU
rank that checkpoints gets it or an error naming the fix; the writer thread takes CPU tensors only."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distopt.checkpoint import step_dir
from distopt.runtime.checkpointing import ShardWriter
from distopt.runtime.writer_main import HostBytes
from distopt.runtime import writer_process
from distopt.runtime.writer_process import ProcessWriter, available, make_writer

pytestmark = pytest.mark.skipif(not available(), reason="the writer process needs Linux memfd")


def _tensors(n: int, seed: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    shard = {"exp_avg": torch.randn(n, generator=g), "exp_avg_sq": torch.rand(n, generator=g),
             "param": torch.randn(n, generator=g), "none": torch.empty(0)}
    model = {"bn.count": torch.tensor(7, dtype=torch.int64), "half": torch.randn(3, 5, generator=g).bfloat16(),
             "mask": torch.rand(13, generator=g) > 0.5}
    return shard, model


def _files(root, step: int) -> dict[str, bytes]:
    folder = step_dir(str(root), step)
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":  # a zombie has exited
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_same_files_and_records_as_the_writer_thread(tmp_path):
    """Three checkpoints in a row, the third larger (the shared memory grows): every file
    and record equals the writer thread's, and rank 0's fields ride back with its record."""
    process, thread = ProcessWriter(), ShardWriter()
    try:
        for step, n in ((2, 100), (4, 100), (6, 5000)):
            shard, model = _tensors(n, step)
            for writer, root in ((process, tmp_path / "process"), (thread, tmp_path / "thread")):
                writer.start(str(root), step, 0, shard, model, {"next_step": step})
            assert not process.busy(), "CPU tensors are copied at start"
            got, want = process.drain(wait=True), thread.drain(wait=True)
            assert got == want and "error" not in got[0] and got[0]["fields"] == {"next_step": step}
            assert _files(tmp_path / "process", step) == _files(tmp_path / "thread", step)
    finally:
        process.close()
        thread.close()


def test_a_rank_without_model_part_and_the_deadline_wait(tmp_path):
    """A rank other than 0 sends its shard only; ``drain(before=...)`` returns the records
    of earlier steps at least."""
    writer = ProcessWriter()
    try:
        shard, _ = _tensors(50_000, 0)
        writer.start(str(tmp_path), 3, 1, shard, None, None)
        writer.start(str(tmp_path), 6, 1, shard, None, None)  # waits for step 3's write: one snapshot at a time
        records = writer.drain(before=4)
        assert records[0]["step"] == 3
        records += writer.drain(wait=True)
        assert [r["step"] for r in records] == [3, 6]
        assert all("shard" in r and "model" not in r and "fields" not in r and "error" not in r for r in records)
    finally:
        writer.close()


def test_a_killed_writer_process_fails_its_writes_then_is_replaced(tmp_path):
    writer = ProcessWriter()
    try:
        shard, model = _tensors(100, 0)
        first = writer.pid
        os.kill(first, signal.SIGKILL)
        assert _gone(first, 5)
        writer.start(str(tmp_path), 2, 0, shard, model, {})
        (record,) = writer.drain(wait=True)  # returns: the lost process is noticed, not waited for
        assert "writer process exited" in record["error"]
        writer.start(str(tmp_path), 4, 0, shard, model, {})
        assert writer.pid != first
        (record,) = writer.drain(wait=True)
        assert "error" not in record and record["step"] == 4
    finally:
        writer.close()


def test_the_writer_process_ends_with_the_training_process():
    code = ("import os, sys; from distopt.runtime.writer_process import ProcessWriter; "
            "w = ProcessWriter(); print(w.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert _gone(int(out.stdout.split()[0]), 10)


def test_close_lets_the_process_finish_what_it_was_sent(tmp_path):
    writer = ProcessWriter()
    pid = writer.pid
    shard, model = _tensors(100, 0)
    writer.start(str(tmp_path), 2, 0, shard, model, {})
    writer.close()
    assert _gone(pid, 20)
    assert sorted(_files(tmp_path, 2)) == ["model.bin", "shard-00000.bin"]


def test_a_write_nobody_will_finish_stops():
    data = memoryview(bytearray(64))
    orphaned = HostBytes(data, "float32", [16], 0, 64, parent=os.getppid() + 1)
    with pytest.raises(RuntimeError, match="training process is gone"):
        list(orphaned.pieces())
    assert b"".join(HostBytes(data, "float32", [16], 0, 64, parent=os.getppid()).pieces()) == bytes(64)


def test_live_shards_are_refused():
    writer = ProcessWriter()
    try:
        with pytest.raises(ValueError, match="live=None"):
            writer.start("/nonexistent", 1, 0, {}, None, None, live=object())
    finally:
        writer.close()


def test_a_gpu_rank_that_checkpoints_gets_the_writer_process():
    chosen = {(kind, on): make_writer(torch.device(kind), on) for kind in ("cuda", "cpu") for on in (True, False)}
    try:
        assert isinstance(chosen["cuda", True], ProcessWriter)
        assert all(isinstance(w, ShardWriter) for key, w in chosen.items() if key != ("cuda", True))
    finally:
        for w in chosen.values():
            w.close()


def test_a_gpu_rank_that_checkpoints_is_refused_where_the_writer_process_cannot_run(monkeypatch):
    """No thread fallback: a host without memfd, or a process that does not start, is an
    error naming the fix before any training; the other ranks keep the writer thread."""
    monkeypatch.setattr(writer_process, "available", lambda: False)
    with pytest.raises(RuntimeError, match=r"memfd_create \(Linux >= 3.17\).*checkpoint_dir=None"):
        make_writer(torch.device("cuda", 0), True)
    assert all(isinstance(make_writer(d, on), ShardWriter)
               for d, on in ((torch.device("cpu"), True), (torch.device("cpu"), False), (torch.device("cuda", 0), False)))
    monkeypatch.setattr(writer_process, "available", lambda: True)

    def no_process(self) -> None:
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(ProcessWriter, "_spawn", no_process)
    with pytest.raises(RuntimeError, match="did not start .*Too many open files.*checkpoint_dir=None") as info:
        make_writer(torch.device("cuda", 0), True)
    assert isinstance(info.value.__cause__, OSError)


def test_the_writer_thread_refuses_tensors_off_the_cpu(tmp_path):
    """A device tensor (``meta`` here, which needs no GPU) is refused at start, naming the
    writer process; nothing is queued."""
    writer = ShardWriter()
    try:
        with pytest.raises(TypeError, match="'param' on meta.*ProcessWriter"):
            writer.start(str(tmp_path), 2, 0, {"exp_avg": torch.zeros(3), "param": torch.zeros(3, device="meta")},
                         None, None)
        with pytest.raises(TypeError, match="'bn.count' on meta"):
            writer.start(str(tmp_path), 2, 0, None, {"bn.count": torch.zeros((), device="meta")}, {})
        assert not writer.busy() and writer.drain(wait=True) == []
    finally:
        writer.close()


def test_a_snapshots_fields_reach_the_shared_memory_in_one_copy():
    """``Buffers.copy`` lays the fields out in one block as the shared memory lays them out,
    so the copies join into one, whose bytes put every field where the message says; tensors
    of their own, or offsets that do not match, stay apart."""
    from distopt.runtime.snapshots import Buffers
    from distopt.runtime.host_snapshot import Placement, bytes_of, join_runs
    g = torch.Generator().manual_seed(3)
    parts = {"a": [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)], "b": [torch.randn(17, generator=g)],
             "c": [torch.randn(1, generator=g)]}
    flats = Buffers().copy(parts, torch.float32, torch.device("cpu"))
    layout = Placement(flats, None)
    runs = join_runs([(bytes_of(t), off) for t, off in zip(flats.values(), layout.offsets)])
    assert len(runs) == 1 and runs[0][1] == 0
    memory = torch.zeros(layout.size, dtype=torch.uint8)
    for src, off in runs:
        memory[off: off + src.numel()] = src
    for name, _, _, off, nbytes in layout.fields["shard"]:
        assert torch.equal(memory[off: off + nbytes], torch.cat([t.reshape(-1) for t in parts[name]]).view(torch.uint8))
    apart = {k: v.clone() for k, v in flats.items()}
    assert len(join_runs([(bytes_of(t), off) for t, off in zip(apart.values(), layout.offsets)])) == 3
    shifted = [(bytes_of(t), off + 64 * i) for i, (t, off) in enumerate(zip(flats.values(), layout.offsets))]
    assert len(join_runs(shifted)) == 3
