"""Checkpoints: round trips, every dtype, damage refused and named, crash safety, prune, reshard."""
from __future__ import annotations

import hashlib
import os
import pickle
import struct
import warnings

import msgpack
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from distopt.checkpoint import (
    CheckpointError, build_manifest, export_safetensors, full_state_from_shards, latest_valid, list_checkpoints,
    load_checkpoint, load_manifest, make_checkpoint_dir, manifest_fields, prune, read_safetensors, read_shards,
    read_tensors, save_checkpoint, step_dir, verify, write_manifest, write_model, write_shard, write_tensors,
    model_file_tensors,
)
from distopt.checkpoint.format import FORMAT_V1, atomic_write
from distopt.checkpoint.manifest import pack_manifest
from distopt.collectives import run_ranks
from distopt.optim import ShardedOptimizer, adam, sgd
from distopt.optim.state_io import shard_params

from odd_params import TiedModel, grads_of as _grads, init_params as _init

BUCKET_BYTES = 256  # several buckets, so the plan's layout matters


def _rule():
    return adam(1e-2, weight_decay=0.01, decoupled=True)


def _train(comms, stage: int, steps: int = 3, rule=_rule) -> list[tuple[dict, ShardedOptimizer]]:
    """Each rank's weights (detached views of the live parameters, as ``model.state_dict()``
    gives them) and optimizer after ``steps`` steps."""
    def body(comm):
        params = _init()
        opt = ShardedOptimizer(params, rule(), comm, zero_stage=stage, bucket_bytes=BUCKET_BYTES)
        for k in range(steps):
            opt.step(grads=_grads(k, comm.rank))
        return {n: t.detach() for n, t in params.items()}, opt
    return run_ranks(comms, body)


def _save(root, step: int, trained: list[tuple[dict, ShardedOptimizer]]):
    """Save as the runtime would: every shard rank's state_dict through the writer."""
    sds = [opt.state_dict() for _, opt in trained]
    fields = manifest_fields(sds[0], trained[0][0], seed=0, next_step=step)
    shards = {r: sds[r]["state"] for r in range(sds[0]["plan"]["world_size"])}
    return save_checkpoint(root, step, fields, trained[0][0], shards)


@pytest.fixture(scope="module")
def two_stage1(groups):
    """2 ranks at zero_stage 1 after 3 steps, and their gathered full state."""
    trained = _train(groups(2), 1)
    full = run_ranks([opt for _, opt in trained], lambda opt: opt.full_state_dict())[0]
    return trained, full


def _assert_full_equal(a: dict, b: dict) -> None:
    assert a["format"] == b["format"] and a["step"] == b["step"] and a["rule"] == b["rule"]
    assert list(a["state"]) == list(b["state"])
    for name in a["state"]:
        assert sorted(a["state"][name]) == sorted(b["state"][name])
        for field, t in a["state"][name].items():
            other = b["state"][name][field]
            assert t.shape == other.shape and t.dtype == other.dtype and torch.equal(t, other), (name, field)


def test_round_trip_of_model_and_shards(tmp_path, two_stage1):
    trained, _ = two_stage1
    path = _save(tmp_path, 3, trained)
    assert path == step_dir(tmp_path, 3) == tmp_path / "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.msgpack", "model.bin", "shard-00000.bin",
                                                      "shard-00001.bin"]
    manifest = verify(path)
    assert set(manifest) == {"format", "step", "next_step", "world_size", "zero_stage", "seed", "optimizer_step",
                             "plan", "rule", "params", "state_fields", "model_keys", "model", "shards",
                             "param_groups"}
    assert manifest["model_keys"] == [[n, n] for n in trained[0][0]] and manifest["model"]["size"] == 0
    run = [manifest[k] for k in ("step", "next_step", "world_size", "zero_stage", "optimizer_step", "seed")]
    assert run == [3, 3, 2, 1, 3, 0]
    assert manifest["plan"] == trained[0][1].plan.to_dict() and manifest["rule"] == _rule().config()
    ckpt = load_checkpoint(path)
    assert list(ckpt.model_state) == list(trained[0][0])
    assert all(torch.equal(ckpt.model_state[n], t) for n, t in trained[0][0].items())
    shards = read_shards(path, manifest)
    for rank, (_, opt) in enumerate(trained):
        # Each rank's file holds its state and its slice of the weights, nothing of the others'.
        expected = {**opt.state_dict()["state"], "param": shard_params(opt)}
        assert list(shards[rank]) == list(expected)
        assert all(torch.equal(shards[rank][f], expected[f]) for f in expected)
    assert list(read_tensors(path, manifest["shards"][1], names=["param"])) == ["param"]
    with pytest.raises(KeyError, match="holds no tensors"):
        read_tensors(path, manifest["shards"][1], names=["nope"])
    assert list_checkpoints(tmp_path) == [path]


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare floats by their bits: NaN != NaN, and -0.0 == 0.0 would hide a wrong sign.
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width) if t.is_floating_point() else t


def test_every_dtype_round_trips_bit_exact(tmp_path):
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 1e-40, 3e38])
    tensors = {}
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        tensors[str(dtype)] = special.to(dtype)
    tensors["int64"] = torch.tensor([[-2**63, 2**63 - 1], [0, -1]], dtype=torch.int64)
    tensors["int32"] = torch.tensor([-2**31, 2**31 - 1, 7], dtype=torch.int32)
    tensors["uint8"] = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    tensors["bool"] = torch.tensor([[True, False, True]])
    tensors["scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 3)
    tensors["transposed"] = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    folder = make_checkpoint_dir(tmp_path, 0)
    record = write_tensors(folder, "t.bin", tensors)
    back = read_tensors(folder, record)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(_bits(back[name]), _bits(t.contiguous())), name
    raw = (folder / "t.bin").read_bytes()
    bf16 = next(r for r in record["tensors"] if r["name"] == "torch.bfloat16")
    # 1.0 in bf16 is the word 0x3F80, stored little-endian.
    assert raw[bf16["offset"] + 4: bf16["offset"] + 6] == b"\x80\x3f"
    f32 = next(r for r in record["tensors"] if r["name"] == "torch.float32")
    assert raw[f32["offset"] + 12: f32["offset"] + 16] == struct.pack("<f", -2.5)
    with pytest.raises(ValueError, match="cannot checkpoint dtype torch.complex64"):
        write_tensors(folder, "c.bin", {"c": torch.zeros(2, dtype=torch.complex64)})
    assert not (folder / "c.bin").exists()


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-5])


def _flip(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_truncate, "is truncated"), (_flip, "does not match its sha256"), (os.remove, "is missing"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "bytes more than"),
])
def test_damaged_shard_is_refused_and_named(tmp_path, two_stage1, damage, message):
    path = _save(tmp_path, 3, two_stage1[0])
    shard = path / "shard-00001.bin"
    damage(shard)
    for check in (verify, load_checkpoint):
        with pytest.raises(CheckpointError, match=message) as info:
            check(path)
        assert str(shard) in str(info.value) and "Fix: use another checkpoint" in str(info.value)
    with pytest.raises(CheckpointError, match="no usable checkpoint"), pytest.warns(RuntimeWarning):
        latest_valid(tmp_path)


def test_each_byte_is_checked_by_its_tensors_digest_before_use(tmp_path, two_stage1):
    path = _save(tmp_path, 3, two_stage1[0])
    record = load_manifest(path)["shards"][0]
    assert "sha256" not in record and [t["offset"] for t in record["tensors"]] == \
        [sum(t["nbytes"] for t in record["tensors"][:i]) for i in range(3)]  # back to back, whole file
    second = record["tensors"][1]
    shard = path / record["file"]
    data = bytearray(shard.read_bytes())
    data[second["offset"] + 5] ^= 0x04
    shard.write_bytes(bytes(data))
    for check in (lambda: read_tensors(path, record), lambda: verify(path)):
        with pytest.raises(CheckpointError, match=r"shard-00000.bin tensor 'exp_avg_sq' .* does not match its sha256"):
            check()
    assert list(read_tensors(path, record, names=["exp_avg"])) == ["exp_avg"]  # only what is returned is used
    forged = dict(record, tensors=[dict(record["tensors"][0], sha256="0" * 64), *record["tensors"][1:]])
    with pytest.raises(CheckpointError, match="do not match its tensors_sha256"):
        read_tensors(path, forged, names=["param"])
    gap = dict(record, tensors=record["tensors"][1:])
    with pytest.raises(CheckpointError, match="starts at byte .*back to back"):
        read_tensors(path, gap)
    record["file"] = "../model.bin"
    with pytest.raises(CheckpointError, match="not a plain file name"):
        read_tensors(path, record)


class _Trap:
    """Unpickling this creates the marker file: the proof that something executed it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_manifest_is_refused_and_never_executed(tmp_path, protocol):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Trap(str(probe))))  # the test's own payload does fire when unpickled
    assert probe.exists()
    marker = tmp_path / "executed"
    folder = make_checkpoint_dir(tmp_path / "root", 1)
    (folder / "manifest.msgpack").write_bytes(pickle.dumps(_Trap(str(marker)), protocol=protocol))
    with pytest.raises(CheckpointError, match="is not a (msgpack|distopt) manifest"):
        load_manifest(folder)
    with pytest.raises(CheckpointError), pytest.warns(RuntimeWarning, match="step-00000001"):
        latest_valid(tmp_path / "root")
    assert not marker.exists()


def test_manifests_that_are_msgpack_but_not_ours_are_refused(tmp_path, two_stage1):
    path = _save(tmp_path, 3, two_stage1[0])
    good = msgpack.unpackb((path / "manifest.msgpack").read_bytes(), raw=False)
    cases = {
        "not a distopt manifest": msgpack.packb([1, 2, 3]),
        "is not a msgpack manifest": msgpack.packb({1: "int keys"}),  # strict_map_key refuses them
        "does not match its own checksum": msgpack.packb({**good, "seed": 1}),
        "this reader reads": msgpack.packb({**good, "format": "distopt.checkpoint.v0"}),
    }
    for message, data in cases.items():
        (path / "manifest.msgpack").write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            load_manifest(path)
    moved = tmp_path / "step-00000007"
    (path / "manifest.msgpack").write_bytes(msgpack.packb(good))
    path.rename(moved)
    with pytest.raises(CheckpointError, match="is for step 3 but sits in the folder of step 7"):
        load_manifest(moved)


def test_a_crash_before_the_manifest_leaves_the_previous_checkpoint_in_use(tmp_path, two_stage1):
    trained, _ = two_stage1
    first = _save(tmp_path, 1, trained)
    # Step 2: both shards written, then the job died before model.bin and the manifest.
    folder = make_checkpoint_dir(tmp_path, 2)
    records = [write_shard(folder, r, opt.state_dict()["state"]) for r, (_, opt) in enumerate(trained)]
    (folder / ".model.bin.tmp.123.abcdef01").write_bytes(b"half a file")  # killed inside atomic_write
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(folder / "model.bin", _chunks_then_fail())
    assert not (folder / "model.bin").exists() and len(list(folder.iterdir())) == 3
    assert records[1]["file"] == "shard-00001.bin"
    assert list_checkpoints(tmp_path) == [first]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an incomplete folder is not damage: no warning
        assert latest_valid(tmp_path) == (first, [])
    third = _save(tmp_path, 3, trained)
    _flip(third / "shard-00000.bin")
    with pytest.warns(RuntimeWarning, match=r"step-00000003.*shard-00000.bin"):
        path, skipped = latest_valid(tmp_path)
    assert path == first and [p for p, _ in skipped] == [third] and "sha256" in skipped[0][1]


def _chunks_then_fail():
    yield b"x" * 100
    raise RuntimeError("disk full")


def test_the_manifest_goes_last_and_a_complete_checkpoint_is_never_rewritten(tmp_path, two_stage1):
    trained, _ = two_stage1
    sds = [opt.state_dict() for _, opt in trained]
    fields = manifest_fields(sds[0], trained[0][0], seed=0, next_step=5)
    folder = make_checkpoint_dir(tmp_path, 5)
    model = write_model(folder, model_file_tensors(trained[0][0], fields))
    shard0 = write_shard(folder, 0, {**sds[0]["state"], "param": shard_params(trained[0][1])})
    shard1 = dict(shard0, file="shard-00001.bin")  # rank 1 has not written yet
    with pytest.raises(FileNotFoundError, match="shard-00001.bin is missing"):
        write_manifest(folder, build_manifest(5, fields, model, [shard0, shard1]))
    without_params = write_shard(folder, 1, sds[1]["state"])
    with pytest.raises(ValueError, match=r"holding \['exp_avg', 'exp_avg_sq'\]; expected .*'param'"):
        build_manifest(5, fields, model, [shard0, without_params])
    whole = write_model(folder, trained[0][0])  # weights the shards hold, written twice
    with pytest.raises(ValueError, match="model.bin holds .*; model_keys place \\[\\] there"):
        build_manifest(5, fields, whole, [shard0, without_params])
    model = write_model(folder, {})
    shard1 = write_shard(folder, 1, {**sds[1]["state"], "param": shard_params(trained[1][1])})
    write_manifest(folder, build_manifest(5, fields, model, [shard0, shard1]))
    assert load_manifest(folder)["next_step"] == 5
    with pytest.raises(FileExistsError, match="already holds a complete checkpoint"):
        write_shard(folder, 0, sds[0]["state"])
    with pytest.raises(FileExistsError):
        _save(tmp_path, 5, trained)
    with pytest.raises(ValueError, match="the plan needs exactly"):
        save_checkpoint(tmp_path, 6, fields, trained[0][0], {0: sds[0]["state"]})
    assert not step_dir(tmp_path, 6).exists()  # refused before anything was written


def test_prune_keeps_the_last_three_and_cleans_debris(tmp_path, two_stage1):
    trained, _ = two_stage1
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, trained)
    old_incomplete = make_checkpoint_dir(tmp_path, 0)
    (old_incomplete / "shard-00000.bin").write_bytes(b"orphan")
    in_progress = make_checkpoint_dir(tmp_path, 9)  # newer than the newest complete one: a writer may be busy
    (in_progress / ".shard-00000.bin.tmp.1.aaaaaaaa").write_bytes(b"busy")
    leftover = step_dir(tmp_path, 4) / ".model.bin.tmp.1.bbbbbbbb"
    leftover.write_bytes(b"stale")
    removed = prune(tmp_path, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000004", "step-00000003"]
    assert sorted(p.name for p in removed) == sorted(["step-00000001", "step-00000002", "step-00000000",
                                                      leftover.name])
    assert in_progress.exists() and not leftover.exists()
    assert prune(tmp_path, keep_last=1) and [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005"]
    with pytest.raises(ValueError, match="keep_last=0 must be an int >= 1"):
        prune(tmp_path, keep_last=0)


@pytest.mark.parametrize("source", [(2, 1), (2, 0), (3, 2)], ids=["2r-stage1", "2r-stage0", "3r-stage2"])
def test_reshard_loads_on_any_world_size_and_stage(tmp_path, groups, two_stage1, source):
    w, stage = source
    trained, full = two_stage1 if source == (2, 1) else (None, None)
    if trained is None:
        trained = _train(groups(w), stage)
        full = run_ranks([opt for _, opt in trained], lambda opt: opt.full_state_dict())[0]
    ckpt = load_checkpoint(_save(tmp_path, 3, trained))
    assert len(ckpt.manifest["shards"]) == (w if stage else 1)  # stage 0: only rank 0's shard is written
    _assert_full_equal(ckpt.optimizer_state, full)
    assert list(ckpt.model_state) == list(trained[0][0])
    assert all(torch.equal(ckpt.model_state[n], t) for n, t in trained[0][0].items())
    for new_w in (1, 2, 3):
        for new_stage in (0, 1, 2):
            def load(comm):
                params = {n: t.clone().requires_grad_() for n, t in ckpt.model_state.items()}  # adopted
                opt = ShardedOptimizer(params, _rule(), comm, zero_stage=new_stage, bucket_bytes=512)
                opt.load_full_state_dict(ckpt.optimizer_state)
                return opt.full_state_dict()
            for got in run_ranks(groups(new_w), load):
                _assert_full_equal(got, full)


def test_resuming_from_a_checkpoint_gives_the_bits_of_an_uninterrupted_run(tmp_path, groups):
    trained = _train(groups(2), 1, steps=3)
    ckpt = load_checkpoint(_save(tmp_path, 3, trained))

    def resume(comm):
        params = {n: t.clone().requires_grad_() for n, t in ckpt.model_state.items()}
        opt = ShardedOptimizer(params, _rule(), comm, zero_stage=1, bucket_bytes=BUCKET_BYTES)
        opt.load_full_state_dict(ckpt.optimizer_state)
        for k in range(ckpt.manifest["next_step"], 6):
            opt.step(grads=_grads(k, comm.rank))
        return params

    def go_on(pair):
        params, opt = pair
        for k in range(3, 6):
            opt.step(grads=_grads(k, opt.comm.rank))
        return params

    uninterrupted = run_ranks(trained, go_on)
    for got, expected in zip(run_ranks(groups(2), resume), uninterrupted):
        assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_reshard_refuses_missing_ranks_and_wrong_sizes(tmp_path, two_stage1):
    path = _save(tmp_path, 3, two_stage1[0])
    manifest = load_manifest(path)
    shards = read_shards(path, manifest)
    with pytest.raises(CheckpointError, match=r"ranks \[0\]; the saved plan needs exactly \[0, 1\]"):
        full_state_from_shards(manifest, {0: shards[0]})
    with pytest.raises(CheckpointError, match="the plan gives every rank"):
        full_state_from_shards(manifest, {0: shards[0], 1: {f: t[:-1] for f, t in shards[1].items()}})
    bad = dict(manifest, plan=dict(manifest["plan"], buckets=[[0, 3]]))
    with pytest.raises(CheckpointError, match="saved plan .* is inconsistent"):
        full_state_from_shards(bad, shards)


def test_safetensors_export_round_trips(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.randn(4, dtype=torch.float64), "h": torch.randn(5).bfloat16(),
             "n": torch.tensor(3, dtype=torch.int64), "mask": torch.tensor([True, False]), "e": torch.zeros(0)}
    path = export_safetensors(state, tmp_path / "model.safetensors", metadata={"step": "3"})
    with safe_open(path, framework="pt") as f:  # the reference reader
        assert f.metadata() == {"step": "3"} and sorted(f.keys()) == sorted(state)
    back = load_file(path)
    assert back.keys() == state.keys() and read_safetensors(path).keys() == state.keys()
    assert all(back[n].dtype == t.dtype and torch.equal(back[n], t) for n, t in state.items())
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ValueError, match="bad.safetensors is not a well-formed safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")
    with pytest.raises(TypeError, match="metadata must map str to str"):
        export_safetensors(state, tmp_path / "x.safetensors", metadata={"step": 3})


def test_exported_weights_load_under_the_models_own_names(tmp_path):
    """A model with tied weights (two names, one tensor) and a buffer: every state_dict name
    is in the file, and load_state_dict(strict=True) takes it back."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 7, bias=False))
    model[2].weight = model[0].weight
    path = export_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    weights = load_file(path)
    assert weights.keys() == model.state_dict().keys()
    fresh = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 7, bias=False))
    fresh.load_state_dict(weights)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_sgd_state_round_trips_with_and_without_momentum(tmp_path, groups):
    for momentum in (0.9, 0.0):
        trained = _train(groups(2), 2, steps=1, rule=lambda: sgd(0.05, momentum=momentum))
        ckpt = load_checkpoint(_save(tmp_path / str(momentum), 1, trained))
        assert ckpt.manifest["state_fields"] == (["momentum_buffer"] if momentum else [])
        full = run_ranks([opt for _, opt in trained], lambda opt: opt.full_state_dict())[0]
        _assert_full_equal(ckpt.optimizer_state, full)  # plain SGD: {"p0": {}, ...}, shards of 0 bytes


def test_weights_no_parameter_holds_go_to_model_bin_and_keys_keep_their_order(tmp_path, groups):
    def body(comm):
        model = TiedModel()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = ShardedOptimizer(params, _rule(), comm, zero_stage=1, bucket_bytes=BUCKET_BYTES)
        for k in range(2):
            idx = torch.arange(8) + k + comm.rank
            loss = torch.nn.functional.cross_entropy(model(idx), idx % 11)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model, params, opt
    trained = run_ranks(groups(2), body)
    model, params, _ = trained[0]
    sds = [opt.state_dict() for _, _, opt in trained]
    expected = model.state_dict()
    fields = manifest_fields(sds[0], params, seed=0, next_step=2, model_state=expected)
    assert dict(map(tuple, fields["model_keys"]))["out.weight"] == "embed.weight"
    in_file = sorted(model_file_tensors(expected, fields))
    assert in_file == sorted(["frozen.bias", "frozen.weight", "norm.num_batches_tracked", "norm.running_mean",
                              "norm.running_var"])
    path = save_checkpoint(tmp_path, 2, fields, expected, {r: sds[r]["state"] for r in range(2)})
    manifest = load_manifest(path)
    assert sorted(t["name"] for t in manifest["model"]["tensors"]) == in_file
    ckpt = load_checkpoint(path)
    assert list(ckpt.model_state) == list(expected)
    for key, t in expected.items():
        assert ckpt.model_state[key].dtype == t.dtype and torch.equal(ckpt.model_state[key], t), key
    fresh = TiedModel()
    fresh.load_state_dict(ckpt.model_state)  # strict: every key, tied ones included
    assert fresh.out.weight is fresh.embed.weight and torch.equal(fresh.out.weight, model.embed.weight)


def test_a_version_1_checkpoint_with_every_weight_in_model_bin_still_loads(tmp_path, two_stage1):
    trained, full = two_stage1
    sds = [opt.state_dict() for _, opt in trained]
    fields = manifest_fields(sds[0], trained[0][0], seed=0, next_step=3)
    del fields["model_keys"]
    folder = make_checkpoint_dir(tmp_path, 3)

    def v1(record: dict) -> dict:  # v1 records hash the whole file
        data = (folder / record["file"]).read_bytes()
        return {"file": record["file"], "size": record["size"], "sha256": hashlib.sha256(data).hexdigest(),
                "tensors": record["tensors"]}
    shards = [v1(write_shard(folder, r, sds[r]["state"])) for r in range(2)]
    model = v1(write_model(folder, trained[0][0]))
    manifest = {"format": FORMAT_V1, **fields, "step": 3, "model": model, "shards": shards}
    atomic_write(folder / "manifest.msgpack", [pack_manifest(manifest)])
    ckpt = load_checkpoint(verify(folder) and folder)
    assert ckpt.manifest["format"] == FORMAT_V1
    assert all(torch.equal(ckpt.model_state[n], t) for n, t in trained[0][0].items())
    _assert_full_equal(ckpt.optimizer_state, full)
    with pytest.raises(ValueError, match="'model_keys' present in a distopt.checkpoint.v1 manifest"):
        pack_manifest({**manifest, "model_keys": [[n, n] for n in trained[0][0]]})
    _flip(folder / "model.bin")
    for check in (verify, load_checkpoint):
        with pytest.raises(CheckpointError, match="model.bin does not match its sha256"):
            check(folder)


def test_cut_params_takes_a_models_own_parameters():
    """Whole weights that require grad (dict(model.named_parameters())) are cut like plain ones."""
    from distopt.checkpoint.reshard import cut_params
    from distopt.optim.plan import build_plan
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    named = dict(model.named_parameters())
    plan, arr = build_plan(list(named), list(named.values()), 2, 1, bucket_bytes=64)
    names = [list(named)[i] for i in arr.order]
    fields = {"plan": plan.to_dict(), "model_keys": [[n, n] for n in names],
              "params": [{"name": n, "shape": list(named[n].shape)} for n in names]}
    shards = cut_params(fields, named)
    whole = torch.zeros(plan.layout.total)
    for r, shard in enumerate(shards):
        plan.place(r, shard, whole)
    for view, n in zip(plan.unflatten(whole, [named[n].shape for n in names]), names):
        assert torch.equal(view, named[n].detach())
