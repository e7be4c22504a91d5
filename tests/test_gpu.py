"""The CUDA paths: NCCL at one rank per GPU, gloo with CUDA tensors where ranks share a GPU.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``python -m pytest -q tests/test_gpu.py``. Needs no Ray.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distopt.collectives import TorchCommunicator, in_process, run_ranks
from distopt.optim import ShardedOptimizer

from collective_battery import battery
from odd_params import grads_of, init_params
from test_sharded import RULES, _reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS = 6


def _nccl_alone() -> TorchCommunicator:
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    torch.cuda.set_device(0)
    return TorchCommunicator(0, 1, backend="nccl", timeout_s=60, store=dist.HashStore(), always_group=True)


def _close(comms) -> None:
    for c in comms:
        c.close()


def test_nccl_group_of_one_runs_every_collective_like_the_local_path():
    comm = _nccl_alone()
    try:
        got = battery(comm, "cuda")
    finally:
        comm.close()
    want = battery(TorchCommunicator(0, 1, backend="nccl"), "cuda")
    for name in want:
        if "wire" in name:  # a real group narrows to bf16 even when alone
            torch.testing.assert_close(got[name], want[name], rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("w", [2, 3])
def test_gloo_with_cuda_tensors_gives_the_cpu_groups_bits(w):
    cpu, gpu = in_process(w, timeout_s=30), in_process(w, timeout_s=30)
    try:
        want = run_ranks(cpu, lambda c: battery(c, "cpu"))
        got = run_ranks(gpu, lambda c: battery(c, "cuda"))
    finally:
        _close(cpu + gpu)
    for r in range(w):
        for name in want[r]:
            assert torch.equal(got[r][name], want[r][name]), f"rank {r}: {name}"


def _cuda_params() -> dict[str, torch.Tensor]:
    """odd_params' parameters on the GPU, leaves that require grad (``.cuda()`` of a leaf is not one)."""
    return {k: v.detach().cuda().requires_grad_() for k, v in init_params().items()}


def _cuda_grads(step: int, rank: int) -> dict[str, torch.Tensor]:
    return {n: g.cuda() for n, g in grads_of(step, rank).items()}


def _train_on_cuda(comms, stage, rule):
    make_rule = RULES[rule][0]

    def body(comm):
        params = _cuda_params()
        opt = ShardedOptimizer(params, make_rule(), comm, zero_stage=stage, bucket_bytes=256)
        for k in range(STEPS):
            opt.step(grads=_cuda_grads(k, comm.rank))
        return {n: p.cpu() for n, p in params.items()}
    return run_ranks(comms, body)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("w", [1, 2, 3])
def test_sharded_optimizer_on_cuda_equals_torch_optim(w, stage, rule):
    comms = [_nccl_alone()] if w == 1 else in_process(w, timeout_s=30)
    try:
        results = _train_on_cuda(comms, stage, rule)
    finally:
        _close(comms)
    expected = _reference(w, RULES[rule][1], steps=STEPS)
    for params in results:
        for name, value in expected.items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(results[0][n], p[n]) for p in results for n in p), "ranks disagree"


def test_fused_adam_update_on_cuda_equals_torch_adam_fused():
    import distopt
    g = torch.Generator(device="cuda").manual_seed(0)
    w0 = torch.randn(100_003, device="cuda", generator=g)
    grads = [torch.randn(100_003, device="cuda", generator=g) for _ in range(5)]
    p = torch.nn.Parameter(w0.clone())
    ref = torch.optim.Adam([p], lr=1e-3, eps=1e-8, fused=True)
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for step, grad in enumerate(grads, start=1):
        p.grad = grad
        ref.step()
        distopt.adam_update([w], [grad], 1e-3, [m], [v], step, epsilon=1e-8, inplace=True)
    assert torch.equal(w, p.detach()), "fused paths disagree"


@pytest.mark.parametrize("stage", [1, 2])
def test_trainer_on_shared_gpu_matches_torch_optim(stage):
    import distopt
    from trainer_task import loss, make_data, make_model, reference
    result = distopt.Trainer(
        model=make_model, loss=loss, data=make_data(), optimizer=distopt.optim.adam(lr=0.01),
        global_batch_size=24, zero_stage=stage, seed=0,
        scaling=distopt.ScalingConfig(num_workers=2, use_gpu=True, ray_address="local"),
        run=distopt.RunConfig(log_every=0, progress=False)).fit(steps=8)
    expected = reference(lambda ps: torch.optim.Adam(ps, lr=0.01), 8, 24)
    for name, value in expected.items():
        # GPU and CPU kernels sum in different orders: close, not equal
        torch.testing.assert_close(result.state_dict[name].cpu(), value, rtol=1e-4, atol=1e-5)
    assert [h["step"] for h in result.history] == list(range(1, 9))


def test_trainer_bf16_on_gpu_trains():
    import distopt
    from trainer_task import loss, make_data, make_model
    result = distopt.Trainer(
        model=make_model, loss=loss, data=make_data(), optimizer=distopt.optim.adam(lr=0.01),
        global_batch_size=24, zero_stage=1, seed=0, mixed_precision="bf16",
        scaling=distopt.ScalingConfig(num_workers=2, use_gpu=True, ray_address="local", grad_wire_dtype="bfloat16"),
        run=distopt.RunConfig(log_every=0, progress=False)).fit(steps=40)
    losses = [h["loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert all(v.dtype == torch.float32 for v in result.state_dict.values()), "master weights left fp32"


def test_checkpoint_written_from_gpu_resumes_on_cpu(tmp_path):
    import distopt
    from trainer_task import loss, make_data, make_model

    def trainer(use_gpu, num_workers, **checkpoint):
        return distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=distopt.optim.adam(lr=0.01),
                               global_batch_size=24, zero_stage=1, seed=0,
                               scaling=distopt.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                                             ray_address="local"),
                               checkpoint=distopt.CheckpointConfig(**checkpoint),
                               run=distopt.RunConfig(log_every=0, progress=False))
    whole = trainer(use_gpu=True, num_workers=2).fit(steps=8)
    trainer(use_gpu=True, num_workers=2, dir=str(tmp_path), every=2).fit(steps=4)
    resumed = trainer(use_gpu=False, num_workers=3, resume_from=str(tmp_path)).fit(steps=8)
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]
    for name, value in whole.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[name].cpu(), value.cpu(), rtol=1e-4, atol=1e-5)


def test_writer_process_writes_gpu_tensors_as_their_cpu_bytes(tmp_path):
    """Through pinned shared memory and a side stream: the files and records equal those a
    CPU rank's writer thread writes of the same tensors moved to the CPU; a CPU part may ride along."""
    from distopt.runtime.checkpointing import ShardWriter
    from distopt.runtime.writer_process import ProcessWriter
    g = torch.Generator(device="cuda").manual_seed(0)
    shard = {"f32": torch.randn(1234, device="cuda", generator=g),
             "bf16": torch.randn(7, 333, device="cuda", generator=g).bfloat16(),
             "i64": torch.arange(-500, 500, device="cuda"), "empty": torch.empty(0, device="cuda"),
             "strided": torch.randn(40, 30, device="cuda", generator=g).t()}
    model = {"flag": torch.rand(999, device="cuda", generator=g) > 0.5, "count": torch.tensor(3)}
    process, thread = ProcessWriter(), ShardWriter()
    try:
        process.start(str(tmp_path / "gpu"), 2, 0, shard, model, {"k": 1})
        thread.start(str(tmp_path / "cpu"), 2, 0, {k: v.cpu() for k, v in shard.items()},
                     {k: v.cpu() for k, v in model.items()}, {"k": 1})
        got, want = process.drain(wait=True), thread.drain(wait=True)
        assert process._memory.pinned
    finally:
        process.close()
        thread.close()
    assert got == want and "error" not in got[0]
    for name in ("shard-00000.bin", "model.bin"):
        assert (tmp_path / "gpu" / "step-00000002" / name).read_bytes() == \
            (tmp_path / "cpu" / "step-00000002" / name).read_bytes(), name


def test_the_writer_thread_refuses_gpu_tensors(tmp_path):
    """A GPU rank has one checkpoint writer, the process: the thread names it and queues nothing."""
    from distopt.runtime.checkpointing import ShardWriter
    writer = ShardWriter()
    try:
        with pytest.raises(TypeError, match="'param' on cuda:0.*ProcessWriter"):
            writer.start(str(tmp_path), 2, 0, {"param": torch.zeros(3, device="cuda")}, None, None)
        assert not writer.busy()
    finally:
        writer.close()


def _written_as_on_the_cpu(tmp_path, step: int, rank: int, shard: dict, drive) -> None:
    """Write ``shard`` with a writer process, ``drive(process)`` moving its copy to the host,
    and its CPU copy with a CPU rank's writer thread: the records and the files must be equal."""
    from distopt.runtime.checkpointing import ShardWriter
    from distopt.runtime.writer_process import ProcessWriter
    process, thread = ProcessWriter(), ShardWriter()
    try:
        process.reserve(sum(t.numel() * t.element_size() for t in shard.values()), torch.device("cuda", 0))
        process.start(str(tmp_path / "gpu"), step, rank, shard, None, None)
        drive(process)
        thread.start(str(tmp_path / "cpu"), step, rank, {k: v.cpu() for k, v in shard.items()}, None, None)
        got, want = process.drain(wait=True), thread.drain(wait=True)
    finally:
        process.close()
        thread.close()
    assert got == want and "error" not in got[0]
    name = f"step-{step:08d}/shard-{rank:05d}.bin"
    assert (tmp_path / "gpu" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes()


def test_writer_process_paces_the_copy_in_pieces_across_steps(tmp_path, monkeypatch):
    """``advance`` queues one piece per call, none while the last is in flight; pieces cut
    tensors of odd sizes anywhere, and the file equals the CPU one."""
    from distopt.runtime import writer_process
    monkeypatch.setattr(writer_process, "FIRST_PIECE", 300_001)
    monkeypatch.setattr(writer_process, "MAX_PIECE", 700_003)
    g = torch.Generator(device="cuda").manual_seed(1)
    shard = {"a": torch.randn(1_000_003, device="cuda", generator=g), "b": torch.randn(77, device="cuda", generator=g),
             "c": torch.randn(250_000, device="cuda", generator=g).double()}

    def drive(process) -> None:
        assert process.busy(), "nothing is copied before the first advance"
        pieces = 0
        while process.busy():
            process.advance(1.0)  # a long step: each piece is capped by MAX_PIECE
            process.advance(1.0)  # the piece just queued is still in flight (or landed): at most one more
            torch.cuda.synchronize()
            pieces += 1
            assert pieces < 50
        assert pieces >= 4
    _written_as_on_the_cpu(tmp_path, 1, 3, shard, drive)


def test_writer_process_copies_a_snapshots_fields_as_one_run(tmp_path, monkeypatch):
    """A snapshot from ``Buffers.copy`` reaches the host as one run of copies (its fields are
    one block laid out like the shared memory), cut into pieces anywhere, padding and all;
    the file equals the CPU one."""
    from distopt.runtime import writer_process
    from distopt.runtime.snapshots import Buffers
    monkeypatch.setattr(writer_process, "FIRST_PIECE", 123_457)
    monkeypatch.setattr(writer_process, "MIN_PIECE", 50_021)
    monkeypatch.setattr(writer_process, "MAX_PIECE", 400_009)
    g = torch.Generator(device="cuda").manual_seed(2)
    parts = {"exp_avg": [torch.randn(100_003, device="cuda", generator=g), torch.randn(7, 9, device="cuda", generator=g)],
             "exp_avg_sq": [torch.rand(100_012, device="cuda", generator=g)],
             "param": [torch.randn(33, device="cuda", generator=g), torch.randn(100_001, device="cuda", generator=g)]}

    def drive(process) -> None:
        process.advance(1.0)
        assert len(process._copying[0].todo) == 1, "the fields were not joined into one run"
        while process.busy():
            torch.cuda.synchronize()
            process.advance(1.0)
    _written_as_on_the_cpu(tmp_path, 4, 1, Buffers().copy(parts, torch.float32, torch.device("cuda", 0)), drive)


def test_gpu_checkpoint_holds_the_step_s_shard_while_training_goes_on(tmp_path):
    """The writer process's side stream waits for the snapshot's copies (queued behind a
    long kernel here) and the shard written is the one of the checkpoint step, whatever the
    next updates do to the live tensors meanwhile."""
    from distopt.checkpoint import read_tensors, step_dir
    from distopt.optim import adam
    from distopt.runtime.snapshots import Buffers, snapshot
    from distopt.runtime.writer_process import ProcessWriter
    comm = _nccl_alone()
    writer = ProcessWriter()
    try:
        opt = ShardedOptimizer(_cuda_params(), adam(1e-2), comm, zero_stage=1, bucket_bytes=256)
        for k in range(3):
            opt.step(grads=_cuda_grads(k, 0))
        torch.cuda._sleep(200_000_000)  # the snapshot's copies wait behind this on training's stream
        snap = snapshot(opt, torch.nn.Module(), 0, 0, 3, False, Buffers(), live=writer.reads_live)
        writer.start(str(tmp_path), 3, 0, snap.shard, snap.model, snap.fields, snap.live)
        want = {k: v.clone() for k, v in snap.shard.items()}  # stream-ordered after the snapshot's copies
        for k in range(3, 6):  # training goes on: the live shard changes, the written one must not
            opt.step(grads=_cuda_grads(k, 0))
        (record,) = writer.drain(wait=True)
    finally:
        writer.close()
        comm.close()
    assert "error" not in record, record
    got = read_tensors(step_dir(str(tmp_path), 3), record["shard"])
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.equal(got[name], value.cpu()), name
    assert not torch.equal(got["param"], torch.cat(opt.shard_params).cpu()), "the live shard moved on"
