"""Evaluation during training: sharded over the workers, averaged exactly by samples, on the
committed weights, the same bits for any worker count, recovered like a step after a failure."""
from __future__ import annotations

import pytest
import torch

import distopt
from distopt import FailureConfig, RunConfig, ScalingConfig
from distopt.optim import adam
from distopt.runtime.config import TrainConfig
from distopt.runtime.evaluation import combine, eval_batches
from distopt.runtime.faults import Fault
from distopt.runtime.worker import Worker
from trainer_task import loss, make_data, make_model, reference

HELD_OUT = make_data(45)  # 45 samples in batches of 10: the last batch is short, so the weights matter
STEPS, BATCH = 8, 16


def single_process(state: dict) -> dict:
    """The held-out loss and MAE of ``state`` in one process, one batch: the oracle."""
    model = make_model()
    model.load_state_dict(state)
    with torch.no_grad():
        x, y = HELD_OUT.tensors
        return {"eval_loss": torch.nn.functional.mse_loss(model(x), y).item(),
                "eval_mae": (model(x) - y).abs().mean().item()}


def _fit(address="local", workers=2, steps=STEPS, faults=(), callbacks=(), **kw):
    return distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2),
                           global_batch_size=BATCH, seed=0, **kw,
                           scaling=ScalingConfig(num_workers=workers, ray_address=address),
                           failure=FailureConfig(collective_timeout_s=5, replace_timeout_s=60, faults=faults),
                           run=RunConfig(log_every=0, callbacks=callbacks)).fit(steps=steps)


def test_each_batch_is_evaluated_once_whatever_the_world_size():
    for world in (1, 2, 3, 5):
        got = sorted(b for r in range(world) for b in eval_batches(45, 10, r, world))
        assert got == [(i, 10 * i, min(45, 10 * i + 10)) for i in range(5)]


def test_workers_of_any_count_give_the_bits_of_each_other_and_the_single_process_value():
    config = TrainConfig(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2), global_batch_size=12,
                         eval_data=HELD_OUT, eval_batch_size=10, scaling=ScalingConfig(num_workers=3))
    values = {}
    for world in (1, 2, 3):
        reports = [Worker(config, r, world).evaluate(0) for r in range(world)]  # same seed: same weights
        values[world] = combine(0, reports, 0.0)
    torch.manual_seed(0)
    expected = single_process(make_model().state_dict())
    for world, record in values.items():
        assert record["eval_loss"] == values[1]["eval_loss"] and record["eval_mae"] == values[1]["eval_mae"]
        assert record["eval_samples"] == 45
        assert record["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
        assert record["eval_mae"] == pytest.approx(expected["eval_mae"], rel=1e-6)


def test_evaluation_during_training_equals_one_process_on_the_committed_weights():
    result = _fit(eval_data=HELD_OUT, eval_every=4, eval_batch_size=10)
    evals = {h["step"]: h for h in result.history if "eval_loss" in h}
    assert sorted(evals) == [4, 8]
    for step in (4, 8):  # the weights after `step` updates, from torch.optim in one process
        expected = single_process(reference(lambda ps: torch.optim.Adam(ps, lr=1e-2), step, BATCH))
        assert evals[step]["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
        assert evals[step]["eval_mae"] == pytest.approx(expected["eval_mae"], rel=1e-5)
    assert result.summary["eval_loss"] == evals[8]["eval_loss"]


def test_evaluation_changes_no_bit_of_training():
    plain, evaluated = _fit(), _fit(eval_data=HELD_OUT, eval_every=2, eval_fn=_eval_fn)
    assert all(torch.equal(plain.state_dict[k], evaluated.state_dict[k]) for k in plain.state_dict)
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in evaluated.history]
    assert [h["step"] for h in evaluated.history if "eval_loss" in h] == [2, 4, 6, 8]
    assert all("eval_mse_sum" in h for h in evaluated.history if "eval_loss" in h)


def _eval_fn(model, batch):
    x, y = batch
    out = model(x)
    return torch.nn.functional.mse_loss(out, y), {"mse_sum": ((out - y) ** 2).sum()}


def test_a_worker_killed_during_evaluation_is_recovered_like_in_a_step(ray_cluster):
    clean = _fit(eval_data=HELD_OUT, eval_every=4, eval_batch_size=10)  # in-process: the Ray runtime's bits
    seen = []

    class OnFailure(distopt.Callback):
        def on_failure(self, record):
            seen.append(record)

    hit = _fit(address=None, eval_data=HELD_OUT, eval_every=4, eval_batch_size=10,
               faults=(Fault(rank=1, step=4, phase="eval"),), callbacks=[OnFailure()])
    assert all(torch.equal(hit.state_dict[k], clean.state_dict[k]) for k in clean.state_dict)
    (failure,) = hit.failures
    assert failure["phase"] == "evaluation" and failure["rank"] == 1 and failure["action"] == "replace"
    assert seen == [failure]  # the callback saw the record FitResult keeps
    assert [h["step"] for h in hit.history] == list(range(1, STEPS + 1))
    for a, b in zip(clean.history, hit.history):
        assert a.get("eval_loss") == b.get("eval_loss") and a["loss"] == b["loss"]
