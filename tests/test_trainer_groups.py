"""Trainer(param_groups=...): AdamW splits and Muon beside AdamW against one torch process,
a scheduled rate shared by groups, bad groups refused before any worker starts, a SIGKILL
and resumes on other worker counts with the hybrid."""
from __future__ import annotations

import pytest
import torch

import distopt
from distopt import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from distopt.checkpoint import step_dir
from distopt.optim import adam, constant
from distopt.runtime.faults import Fault
from trainer_task import decay_split, hybrid_split, loss, make_data, make_model, reference_groups

STEPS, BATCH = 8, 12


def _fit(groups, address="local", optimizer=None, steps=STEPS, workers=2, zero_stage=1, faults=(),
         checkpoint_dir=None, resume_from=None):
    trainer = distopt.Trainer(
        model=make_model, loss=loss, data=make_data(),
        optimizer=optimizer or adam(1e-2, weight_decay=0.1, decoupled=True), global_batch_size=BATCH, param_groups=groups, seed=0, zero_stage=zero_stage,
        scaling=ScalingConfig(num_workers=workers, ray_address=address),
        failure=FailureConfig(collective_timeout_s=4 if faults else 10, replace_timeout_s=60, faults=faults),
        checkpoint=CheckpointConfig(dir=checkpoint_dir, every=4 if checkpoint_dir else 0, resume_from=resume_from),
        run=RunConfig(log_every=0))
    return trainer.fit(steps=steps)


def _torch_decay(model, lambda_lr=None):
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0, "lr": 5e-3}],
                            lr=1e-2)
    if lambda_lr is None:
        return [opt]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lambda_lr(i + 1))  # update i + 1 is 1-based
    return [opt, sched]


def _torch_hybrid(model):
    named = list(model.named_parameters())
    hidden = {"0.weight"}
    return [torch.optim.Muon([p for n, p in named if n in hidden], lr=0.02, weight_decay=0.1),
            torch.optim.AdamW([{"params": [p for n, p in named if n not in hidden and p.ndim >= 2],
                                "weight_decay": 0.1},
                               {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}], lr=1e-2)]


def _close(result, expected):
    assert set(result.state_dict) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-5, atol=1e-6, msg=name)


# Stage 1 in-process, stage 2 on Ray: the groups travel to the actors with the config.
@pytest.mark.parametrize("stage,address", [(1, "local"), (2, None)])
def test_decay_groups_match_torch_adamw_with_the_same_groups(ray_cluster, stage, address):
    _close(_fit(decay_split, address=address, zero_stage=stage), reference_groups(_torch_decay, STEPS, BATCH))


@pytest.mark.parametrize("workers,stage", [(1, 0), (2, 1), (3, 2)])
def test_muon_beside_adamw_matches_torch_muon_plus_adamw(workers, stage):
    _close(_fit(hybrid_split, workers=workers, zero_stage=stage), reference_groups(_torch_hybrid, STEPS, BATCH))


def test_a_scheduled_rate_is_scaled_by_a_groups_lr():
    """The rule's schedule peaks at 1e-2; the undecayed group's lr 5e-3 runs it at half."""
    schedule = constant(1e-2, warmup_steps=4)
    result = _fit(decay_split, optimizer=adam(schedule, weight_decay=0.1, decoupled=True))
    factor = lambda step: schedule(step) / 1e-2  # noqa: E731
    _close(result, reference_groups(lambda m: _torch_decay(m, factor)[:1] and _torch_decay_sched(m, factor),
                                    STEPS, BATCH))


def _torch_decay_sched(model, factor):
    opt, sched = _torch_decay(model, factor)
    return [opt, _AfterStep(sched)]


class _AfterStep:
    """A scheduler in the list of optimizers: stepped after the optimizer, never zeroed."""

    def __init__(self, sched) -> None:
        self.sched = sched

    def zero_grad(self) -> None:
        pass

    def step(self) -> None:
        self.sched.step()


def _not_a_list(model):
    return {"params": list(model.parameters())}


def _foreign_tensor(model):
    return [{"params": list(model.parameters()) + [torch.zeros(3, requires_grad=True)]}]


def _twice(model):
    ps = list(model.parameters())
    return [{"params": ps}, {"params": ps[:1]}]


def _left_out(model):
    return [{"params": list(model.parameters())[:-1]}]


def _muon_on_a_bias(model):
    from distopt.optim import muon
    return [{"params": list(model.parameters()), "rule": muon(0.02)}]


@pytest.mark.parametrize("fn, exc, match", [
    (_not_a_list, TypeError, "must return a list of dicts"),
    (_foreign_tensor, ValueError, "not a trainable parameter of the model"),
    (_twice, ValueError, "'0.weight' is in group 0 and group 1"),
    (_left_out, ValueError, r"\['2.bias'\] are in no group"),
    (_muon_on_a_bias, ValueError, "'0.bias'.*2-D"),
    (42, TypeError, "module-level function"),
])
def test_bad_param_groups_fail_before_any_worker_starts(fn, exc, match):
    with pytest.raises(exc, match=match):
        distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2),
                        global_batch_size=BATCH, param_groups=fn, scaling=ScalingConfig(ray_address="local"))


@pytest.fixture(scope="module")
def hybrid_clean(ray_cluster):
    return _fit(hybrid_split)  # in-process: the Ray runtime's bits, without two actor starts


def test_sigkill_mid_update_with_muon_beside_adamw_costs_no_bit(hybrid_clean):
    result = _fit(hybrid_split, address=None, faults=(Fault(rank=1, step=4, phase="shard_update"),))
    assert all(torch.equal(result.state_dict[k], v) for k, v in hybrid_clean.state_dict.items())
    assert [h["loss"] for h in result.history] == [h["loss"] for h in hybrid_clean.history]
    assert len(result.failures) == 1


@pytest.fixture(scope="module")
def hybrid_saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    return root, _fit(hybrid_split, checkpoint_dir=root, steps=12)


@pytest.mark.parametrize("workers,stage", [(1, 1), (3, 2)])
def test_a_two_worker_hybrid_checkpoint_resumes_on_one_and_three_workers(hybrid_saved, workers, stage):
    root, uninterrupted = hybrid_saved
    resumed = _fit(hybrid_split, workers=workers, zero_stage=stage, resume_from=step_dir(root, 8), steps=12)
    assert [h["step"] for h in resumed.history] == [9, 10, 11, 12]
    for name, value in uninterrupted.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[name], value, rtol=1e-5, atol=1e-6)


def _hybrid_without_muon(model):
    return [{k: v for k, v in g.items() if k != "rule"} for g in hybrid_split(model)]


@pytest.mark.parametrize("groups, match", [(decay_split, "3 parameter groups, this run has 2"),
                                           (_hybrid_without_muon, "group 0 has rule_name='muon'.*'adam'"),
                                           (None, "3 parameter groups, this run has 1")])
def test_resuming_under_other_groups_is_refused_naming_the_difference(hybrid_saved, groups, match):
    root, _ = hybrid_saved
    with pytest.raises(ValueError, match=match):
        _fit(groups, resume_from=step_dir(root, 8), steps=12)
