"""distopt.Trainer on Ray against one process running torch.optim, plus its errors."""
from __future__ import annotations

import time

import pytest
import torch

import distopt
from distopt import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from distopt.optim import adam, sgd
from trainer_task import loss, make_data, make_model, reference

QUIET = RunConfig(log_every=0)
STEPS, BATCH = 12, 16  # 96 samples: 6 steps per epoch, so the run crosses an epoch boundary
RULES = {
    "sgd": (lambda: sgd(0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "adam": (lambda: adam(1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
}


def _fit(rule="adam", address=None, workers=2, wire=None, **kw):
    trainer = distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=RULES[rule][0](),
                              global_batch_size=BATCH, seed=0, **{"zero_stage": 1, **kw},
                              scaling=ScalingConfig(num_workers=workers, ray_address=address, grad_wire_dtype=wire),
                              failure=FailureConfig(collective_timeout_s=20), run=QUIET)
    return trainer.fit(steps=STEPS)


def _matches_torch_optim(result, rule):
    expected = reference(RULES[rule][1], STEPS, BATCH)
    assert set(result.state_dict) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-5, atol=1e-5)
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    assert all({"loss", "time_s", "mae", "compute_s", "comm_s"} <= set(h) for h in result.history)
    assert result.failures == []


def _same_bits(a, b):
    assert set(a.state_dict) == set(b.state_dict)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("workers", [1, 2])
def test_trainer_matches_single_process_torch_optim(workers, stage, rule):
    # The whole matrix runs in-process: the same Worker code as on Ray, and
    # test_ray_runtime_gives_the_in_process_bits holds the two runtimes to the same bits.
    _matches_torch_optim(_fit(rule, workers=workers, zero_stage=stage, address="local"), rule)


@pytest.mark.parametrize("rule,stage", [("sgd", 0), ("adam", 2)])
def test_ray_runtime_gives_the_in_process_bits(ray_cluster, rule, stage):
    """Two actors on Ray: the torch.optim oracle, the in-process runtime's bits, and the same
    bits again from the same configuration (the Ray group is the same for every stage; the
    two ends of the matrix are run)."""
    ray_run = _fit(rule, zero_stage=stage)
    _matches_torch_optim(ray_run, rule)
    _same_bits(ray_run, _fit(rule, zero_stage=stage, address="local"))
    if stage == 2:
        _same_bits(ray_run, _fit(rule, zero_stage=stage))


def test_gradient_accumulation_and_clipping_match_reference(ray_cluster):
    result = _fit("sgd", address="local", gradient_accumulation_steps=2, max_grad_norm=0.05)

    class Clipped(torch.optim.SGD):
        def step(self):
            torch.nn.utils.clip_grad_norm_(self.param_groups[0]["params"], 0.05)
            super().step()

    expected = reference(lambda ps: Clipped(ps, lr=0.1, momentum=0.9), STEPS, BATCH)
    for name, value in expected.items():
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-5, atol=1e-5)


def _raise_in_model():
    raise RuntimeError("boom in the model builder")


def _vector_loss(model, batch):
    return (model(batch[0]) - batch[1]) ** 2


def test_model_builder_that_raises_names_the_rank(ray_cluster):
    trainer = distopt.Trainer(model=_raise_in_model, loss=loss, data=make_data(), optimizer=adam(1e-3),
                              global_batch_size=BATCH, run=QUIET)
    t0 = time.monotonic()
    with pytest.raises(distopt.WorkerError, match=r"worker rank \d failed during setup: .*boom in the model builder"):
        trainer.fit(steps=2)
    assert time.monotonic() - t0 < 60


def test_non_scalar_loss_is_a_clear_error(ray_cluster):
    trainer = distopt.Trainer(model=make_model, loss=_vector_loss, data=make_data(), optimizer=adam(1e-3),
                              global_batch_size=BATCH, failure=FailureConfig(collective_timeout_s=10), run=QUIET)
    t0 = time.monotonic()
    with pytest.raises(distopt.WorkerError, match=r"during step 0: .*scalar"):
        trainer.fit(steps=2)
    assert time.monotonic() - t0 < 60


def test_more_workers_than_the_cluster_can_place(ray_cluster):
    trainer = distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-3),
                              global_batch_size=BATCH, scaling=ScalingConfig(num_workers=4, placement_timeout_s=5),
                              run=QUIET)
    with pytest.raises(distopt.PlacementError, match=r"num_workers=4 .* lower num_workers"):
        trainer.fit(steps=1)


@pytest.mark.parametrize("kwargs,exc,message", [
    ({"global_batch_size": 30, "scaling": ScalingConfig(num_workers=4)}, ValueError,
     r"global_batch_size=30 is not divisible by num_workers \* gradient_accumulation_steps = 4 \* 1 = 4: "
     r"use a multiple of 4"),
    ({"global_batch_size": 16, "gradient_accumulation_steps": 3}, ValueError, r"use a multiple of 6"),
    ({"global_batch_size": 128}, ValueError, r"dataset has 96 samples, fewer than one global batch of 128"),
    ({"model": make_model()}, TypeError, r"pass the class or a factory"),
    ({"zero_stage": 3}, ValueError, r"zero_stage=3 must be 0, 1 or 2"),
    ({"optimizer": torch.optim.Adam}, TypeError, r"is not an update rule"),
    ({"scaling": {"num_workers": 2}}, TypeError, r"scaling must be a distopt.ScalingConfig, got dict"),
    ({"run": ScalingConfig()}, TypeError, r"run must be a distopt.RunConfig, got ScalingConfig"),
    ({"failure": FailureConfig(min_workers=3)}, ValueError,
     r"FailureConfig.min_workers=3 is more than ScalingConfig.num_workers=2"),
    ({"eval_every": 5}, ValueError, r"eval_every, eval_fn and eval_batch_size need eval_data="),
    ({"eval_data": make_data(), "eval_fn": 3}, TypeError, r"eval_fn must be a callable"),
    ({"eval_data": [], "eval_every": 2}, TypeError, r"eval_data must be a non-empty map-style dataset"),
    ({"run": RunConfig(callbacks=[3])}, TypeError, r"RunConfig.callbacks\[0\] is a int, which has none of the hooks"),
])
def test_bad_arguments_fail_at_construction(kwargs, exc, message):
    args = {"model": make_model, "loss": loss, "data": make_data(), "optimizer": adam(1e-3),
            "global_batch_size": 16, **kwargs}
    with pytest.raises(exc, match=message):
        distopt.Trainer(**args)


@pytest.mark.parametrize("make, message", [
    (lambda: ScalingConfig(num_workers="2"), r"ScalingConfig.num_workers='2' must be an int >= 1"),
    (lambda: ScalingConfig(use_gpu=1), r"ScalingConfig.use_gpu=1 must be True or False"),
    (lambda: ScalingConfig(placement_strategy="pack"), r"ScalingConfig.placement_strategy='pack' must be one of"),
    (lambda: ScalingConfig(grad_wire_dtype="fp8"), r"ScalingConfig.grad_wire_dtype='fp8' must be None, 'bfloat16'"),
    (lambda: FailureConfig(shared_memory="yes"), r"FailureConfig.shared_memory='yes' must be True or False"),
    (lambda: FailureConfig(replica_log_depth=0), r"FailureConfig.replica_log_depth=0 must be an int in \[1, 64\]"),
    (lambda: FailureConfig(max_failures=0, spare_workers=1), r"FailureConfig.spare_workers=1 needs fault tolerance"),
    (lambda: FailureConfig(step_timeout_s=0), r"FailureConfig.step_timeout_s=0 must be > 0 seconds"),
    (lambda: CheckpointConfig(every=5), r"CheckpointConfig.every=5 needs a dir to write to"),
    (lambda: CheckpointConfig(keep_last=0), r"CheckpointConfig.keep_last=0 must be an int >= 1"),
    (lambda: RunConfig(log_every=-1), r"RunConfig.log_every=-1 must be an int >= 0"),
    (lambda: RunConfig(progress="auto"), r"RunConfig.progress='auto' must be True, False or None"),
    (lambda: RunConfig(callbacks=["wandb"]), r"RunConfig.callbacks\[0\]='wandb' must be one of"),
])
def test_bad_config_groups_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_embedded_ray_is_shut_down_after_fit_and_after_a_failure():
    import os
    import subprocess
    import sys
    script = """
import ray, distopt
from distopt.optim import adam
from trainer_task import loss, make_data, make_model
def broken():
    raise RuntimeError("broken builder")
kw = dict(loss=loss, data=make_data(), optimizer=adam(1e-3), global_batch_size=16,
          scaling=distopt.ScalingConfig(num_workers=1), run=distopt.RunConfig(log_every=0))
distopt.Trainer(model=make_model, **kw).fit(steps=2)
print("after fit:", ray.is_initialized())
try:
    distopt.Trainer(model=broken, **kw).fit(steps=2)
except distopt.WorkerError:
    print("after failure:", ray.is_initialized())
"""
    here = os.path.dirname(os.path.abspath(__file__))
    paths = os.pathsep.join([here, os.path.dirname(here)])  # this checkout's distopt, not another install's
    done = subprocess.run([sys.executable, "-c", script], cwd=here, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": paths})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "after fit: False" in done.stdout and "after failure: False" in done.stdout


def test_bf16_wire_and_bf16_autocast_train_close_to_fp32():
    fp32 = _fit(address="local")
    for kw in ({"wire": torch.bfloat16}, {"mixed_precision": "bf16"}):
        low = _fit(address="local", **kw)
        assert low.history[-1]["loss"] < low.history[0]["loss"]
        for name, value in fp32.state_dict.items():
            assert low.state_dict[name].dtype == torch.float32  # master weights stay fp32
            torch.testing.assert_close(low.state_dict[name], value, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="grad_wire_dtype=torch.float64 must be None"):
        _fit(address="local", wire=torch.float64)
    with pytest.raises(ValueError, match="mixed_precision='fp8' must be None or 'bf16'"):
        _fit(address="local", mixed_precision="fp8")
