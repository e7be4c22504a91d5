"""Real process kills during training: every step redone once, the same bits at the end."""
from __future__ import annotations

import time

import pytest
import torch

import distopt
from distopt import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from distopt.optim import adam
from distopt.runtime.faults import Fault
from trainer_task import loss, make_data, make_model

STEPS = 8


def _fit(stage, faults=(), workers=2, cpus=1.0, ckpt=None, out=None, address=None, **failure):
    """``ckpt``: a checkpoint folder, written every 2 steps; ``failure``: more FailureConfig fields."""
    trainer = distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2, weight_decay=0.01),
                              global_batch_size=16, zero_stage=stage, seed=0,
                              scaling=ScalingConfig(num_workers=workers, cpus_per_worker=cpus, ray_address=address),
                              # A replacement may start slowly on a loaded machine (a timeout here is a
                              # shrink, not a pass); a hung step fails in a minute, not the 300 s default.
                              failure=FailureConfig(collective_timeout_s=4, replace_timeout_s=60, step_timeout_s=60,
                                                    faults=faults, **failure),
                              checkpoint=CheckpointConfig(dir=ckpt, every=2 if ckpt else 0),
                              run=RunConfig(out_dir=out, log_every=0))
    return trainer.fit(steps=STEPS)


@pytest.fixture(scope="module")
def clean(ray_cluster):
    # The uninterrupted runs in-process: the same Worker code and the same bits as on Ray
    # (test_trainer.py::test_ray_runtime_gives_the_in_process_bits), without four actor starts.
    return {stage: _fit(stage, address="local") for stage in (1, 2)}


def _same(a, b):
    return all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


# Each phase killed on Ray, two kills per run (a fault fires in a rank's first process only,
# so one per rank), ``first`` dying early and the other rank once the group has re-formed.
# Every phase at every stage is killed in-process, bit for bit, by tests/test_recovery.py.
@pytest.mark.parametrize("stage, early, late, first", [
    (1, "data", "param_gather", 1), (2, "compute", "shard_update", 1),
    (1, "grad_collective", "shard_update", 0), (2, "param_gather", "grad_collective", 0)])
def test_sigkill_at_each_phase_costs_no_step_and_no_bit(clean, stage, early, late, first):
    t0 = time.monotonic()
    result = _fit(stage, faults=(Fault(rank=first, step=2, phase=early), Fault(rank=1 - first, step=5, phase=late)))
    assert _same(result, clean[stage]), "recovery changed the final weights"
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    assert [h["loss"] for h in result.history] == [h["loss"] for h in clean[stage].history]
    assert [(f["rank"], f["step"], f["action"], f["cause"]) for f in result.failures] == [
        (first, 3, "replace", "process died"), (1 - first, 6, "replace", "process died")]
    assert time.monotonic() - t0 < 120


def test_sigkill_on_the_across_hosts_path_costs_no_bit_either(clean):
    """shared_memory=False: the gradients go with a ring shift and each rank keeps copies of
    its own shard and a gradient log, as between hosts; a rank killed after the updates began
    is undone from them. replica_log_depth=2 (a chunk copied every other step, two gradient
    shards logged), so these undos replay across the log's wrap."""
    faults = (Fault(rank=1, step=4, phase="shard_update"), Fault(rank=0, step=6, phase="param_gather"))
    result = _fit(1, faults=faults, shared_memory=False, replica_log_depth=2)
    assert _same(result, clean[1]), "recovery changed the final weights"
    assert [(f["rank"], f["step"], f["action"]) for f in result.failures] == [(1, 5, "replace"), (0, 7, "replace")]


def test_replacement_that_dies_while_starting_means_a_shrink(clean):
    """The fresh replacement's process dies while it builds its model (as when its node goes
    away during the start): no replacement, so the run goes on with one worker, on the same math."""
    faults = (Fault(rank=1, step=3, phase="compute"), Fault(rank=1, step=3, phase="setup"))
    result = _fit(1, faults=faults, grow_back=False)
    (failure,) = result.failures
    assert (failure["rank"], failure["step"], failure["action"], failure["world_size"]) == (1, 4, "shrink", 1)
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    assert [h["world_size"] for h in result.history] == [2] * 3 + [1] * (STEPS - 3)
    for name, value in clean[1].state_dict.items():  # same math; summation order may differ
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-5, atol=1e-6)


def test_stopped_worker_is_detected_by_deadline_and_replaced(clean):
    result = _fit(2, faults=(Fault(rank=0, step=3, phase="compute", action="stop"),))
    assert _same(result, clean[2])
    (failure,) = result.failures
    assert failure["rank"] == 0 and failure["cause"].startswith("hung")
    assert failure["detect_s"] < 4 + 5 + 5  # collective timeout + margin + the step itself


def test_past_max_failures_the_run_raises_with_the_records(ray_cluster):
    faults = (Fault(rank=0, step=1, phase="compute"), Fault(rank=1, step=3, phase="compute"))
    with pytest.raises(distopt.TrainingError, match="exceed max_failures=1") as info:
        _fit(1, faults=faults, max_failures=1)
    assert [f["step"] for f in info.value.failures] == [2, 4]


def test_warm_spare_takes_the_lost_rank(clean):
    result = _fit(1, faults=(Fault(rank=1, step=3, phase="compute"), Fault(rank=0, step=6, phase="data")),
                  spare_workers=1, cpus=0.5)
    assert _same(result, clean[1])
    first, second = result.failures
    assert first["action"] == second["action"] == "replace"
    assert first["replace_s"] < 3  # the spare had its model built: no actor start on the critical path


BOTH_AT_5 = (Fault(rank=0, step=5, phase="compute"), Fault(rank=1, step=5, phase="compute"))


def test_every_worker_lost_at_once_goes_back_to_the_checkpoint_and_ends_the_same(clean, tmp_path):
    result = _fit(1, faults=BOTH_AT_5, max_failures=2, ckpt=str(tmp_path / "ckpt"),
                  out=str(tmp_path / "run"))
    assert _same(result, clean[1]), "the steps redone from the checkpoint changed the weights"
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    assert [h["loss"] for h in result.history] == [h["loss"] for h in clean[1].history]
    assert sorted(f["rank"] for f in result.failures) == [0, 1]
    # The newest complete checkpoint is step 4, or step 2 if step 4's write was still running.
    assert all(f["action"] in ("replace, restart from checkpoint step 4", "replace, restart from checkpoint step 2")
               for f in result.failures), result.failures
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        import json
        assert [json.loads(line)["step"] for line in f] == list(range(1, STEPS + 1))


def test_every_worker_lost_without_a_checkpoint_fails_naming_the_fix(ray_cluster):
    with pytest.raises(distopt.TrainingError,
                       match=r"no checkpoint to fall back on .*CheckpointConfig\(dir=..., every=...\)") as info:
        _fit(1, faults=BOTH_AT_5, max_failures=2)
    assert sorted(f["rank"] for f in info.value.failures) == [0, 1]


@pytest.fixture(scope="module")
def clean4(ray_cluster):
    return _fit(1, workers=4, address="local")


def test_rank_lost_during_the_recovery_is_recovered_from_memory_too(clean4):
    # Four ranks at stage 1: rank 1 dies in step 5, rank 3 while the group is re-formed.
    # Shard 1 lives on in rank 2's replica, shard 3 in rank 0's: the second attempt
    # rebuilds both from memory and the run ends with the clean run's bits.
    faults = (Fault(rank=1, step=4, phase="compute"), Fault(rank=3, step=4, phase="recovery"))
    result = _fit(1, faults=faults, workers=4, cpus=0.5)
    assert _same(result, clean4)
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    assert [(f["rank"], f["step"], f["action"]) for f in result.failures] == [(1, 5, "replace"), (3, 5, "replace")]
    assert result.failures[1]["phase"] == "recovery"


def test_last_holder_lost_during_the_recovery_falls_back_to_the_checkpoint(clean, tmp_path):
    # Two ranks: rank 1 dies, then rank 0 (the only holder of both shards) during the
    # recovery; memory cannot rebuild the commit, the checkpoint can.
    faults = (Fault(rank=1, step=5, phase="compute"), Fault(rank=0, step=5, phase="recovery"))
    result = _fit(1, faults=faults, ckpt=str(tmp_path / "ckpt"))
    assert _same(result, clean[1])
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    assert [f["rank"] for f in result.failures] == [1, 0]
    assert result.failures[1]["action"].startswith("replace, restart from checkpoint step")


def test_rank_lost_while_going_back_to_the_checkpoint_is_replaced_too(clean4, tmp_path):
    # Ranks 1 and 2 die together (shard 1 and its replica), so the run goes back to the
    # checkpoint; rank 0 dies while the group re-forms for it. Replaced, the run still ends
    # with the clean run's bits.
    faults = (Fault(rank=1, step=5, phase="compute"), Fault(rank=2, step=5, phase="compute"),
              Fault(rank=0, step=5, phase="recovery"))
    result = _fit(1, faults=faults, workers=4, cpus=0.5, ckpt=str(tmp_path / "ckpt"))
    assert _same(result, clean4)
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    assert sorted(f["rank"] for f in result.failures[:2]) == [1, 2] and result.failures[2]["rank"] == 0
    assert result.failures[2]["phase"] == "recovery"
    assert all("restart from checkpoint step" in f["action"] for f in result.failures)
