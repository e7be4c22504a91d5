"""Callbacks on the driver: order and records, errors that stop the run with checkpoints intact,
refused callbacks, and the built-in TensorBoard and MLflow loggers read back with their own readers."""
from __future__ import annotations

import pytest

import distopt
from distopt import CheckpointConfig, RunConfig, ScalingConfig
from distopt.checkpoint import list_checkpoints, step_dir, verify
from distopt.optim import adam
from distopt.runtime.checkpointing import load_for_resume
from trainer_task import loss, make_data, make_model

HELD_OUT = make_data(40)


def _trainer(callbacks=(), out=None, steps_between_evals=2, **checkpoint):
    return distopt.Trainer(model=make_model, loss=loss, data=make_data(), optimizer=adam(1e-2),
                           global_batch_size=16, seed=0, eval_data=HELD_OUT, eval_every=steps_between_evals,
                           scaling=ScalingConfig(num_workers=2, ray_address="local"),
                           checkpoint=CheckpointConfig(**checkpoint),
                           run=RunConfig(out_dir=out, log_every=0, callbacks=callbacks))


class Recorder(distopt.Callback):
    def __init__(self):
        self.events = []

    def on_step_end(self, record):
        self.events.append(("step", record["step"], dict(record)))

    def on_eval(self, record):
        self.events.append(("eval", record["step"], dict(record)))

    def on_checkpoint(self, record):
        self.events.append(("checkpoint", record["step"], dict(record)))

    def on_fit_end(self, result):
        self.events.append(("end", None, result))


def test_callbacks_fire_in_order_with_the_records(tmp_path):
    rec, steps_seen = Recorder(), []
    result = _trainer([rec, lambda record: steps_seen.append(record["step"])], dir=str(tmp_path), every=2).fit(4)
    kinds = [(kind, step) for kind, step, _ in rec.events if kind != "checkpoint"]
    assert kinds == [("step", 1), ("eval", 2), ("step", 2), ("step", 3), ("eval", 4), ("step", 4), ("end", None)]
    steps = {step: record for kind, step, record in rec.events if kind == "step"}
    assert [steps[s] for s in (1, 2, 3, 4)] == result.history  # the history entries themselves
    evals = {step: record for kind, step, record in rec.events if kind == "eval"}
    assert steps[2]["eval_loss"] == evals[2]["eval_loss"] and evals[2]["eval_samples"] == 40
    checkpoints = [(step, r["path"]) for kind, step, r in rec.events if kind == "checkpoint"]
    assert checkpoints and checkpoints[-1] == (4, str(step_dir(tmp_path, 4)))
    for step, path in checkpoints:  # announced once complete on disk, after its step committed
        verify(path)
        assert rec.events.index(next(e for e in rec.events if e[0] == "checkpoint" and e[1] == step)) > \
            rec.events.index(next(e for e in rec.events if e[0] == "step" and e[1] == step))
    assert rec.events[-1][2] is result and steps_seen == [1, 2, 3, 4]


class Raises(distopt.Callback):
    def on_step_end(self, record):
        if record["step"] == 5:
            raise RuntimeError("dashboard unreachable")


def test_a_callback_that_raises_stops_the_run_and_leaves_the_checkpoints_intact(tmp_path):
    with pytest.raises(distopt.CallbackError, match=r"Raises.*on_step_end at step 5 raised RuntimeError: "
                                                    r"dashboard unreachable; the run stopped") as info:
        _trainer([Raises()], dir=str(tmp_path), every=2).fit(8)
    assert isinstance(info.value.__cause__, RuntimeError)
    written = list_checkpoints(tmp_path)
    assert step_dir(tmp_path, 4) in written and step_dir(tmp_path, 6) not in written
    for folder in written:
        verify(folder)
    assert load_for_resume(str(tmp_path)).manifest["next_step"] == 4


@pytest.mark.parametrize("callbacks, exc, message", [
    ([Recorder], TypeError, r"callbacks\[0\] is the class Recorder: pass an instance"),
    ([object()], TypeError, r"callbacks\[0\] is a object, which has none of the hooks"),
    (["tensorboard"], ValueError, r"'tensorboard' writes to out_dir/tensorboard: set RunConfig.out_dir"),
    (["no_such_module_xyz:cb"], ValueError, r"'no_such_module_xyz:cb' cannot be imported"),
])
def test_bad_callbacks_are_refused_before_anything_starts(callbacks, exc, message):
    with pytest.raises(exc, match=message):
        _trainer(callbacks)


def test_tensorboard_event_files_read_back_with_tensorboards_reader(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _trainer(["tensorboard"], out=str(tmp_path)).fit(6)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in losses] == pytest.approx([h["loss"] for h in result.history], rel=1e-6)
    evals = {e.step: e.value for e in events.Scalars("eval/loss")}
    assert evals == pytest.approx({h["step"]: h["eval_loss"] for h in result.history if "eval_loss" in h}, rel=1e-6)
    assert "eval/mae" in events.Tags()["scalars"] and "train/eval_loss" not in events.Tags()["scalars"]


def test_mlflow_logger_records_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder store, no server
    uri = f"file://{tmp_path}/mlruns"
    logger = distopt.MLflowLogger(experiment="distopt-test", run_name="tiny", tracking_uri=uri)
    result = _trainer([logger]).fit(4)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("distopt-test").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(h["step"], pytest.approx(h["loss"])) for h in result.history]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [2, 4]
    assert run.data.metrics["summary/eval_loss"] == pytest.approx(result.summary["eval_loss"])
    assert run.info.status == "FINISHED"
