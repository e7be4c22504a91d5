"""`distopt train` on a small user module, end to end: console script, embedded Ray, outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from distopt.checkpoint import read_safetensors


def test_distopt_train_runs_a_user_module(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "distopt")
    out = tmp_path / "run"
    cmd = [script, "train", "--model", "cli_fixture_module:make_model", "--loss", "cli_fixture_module:loss",
           "--data", "cli_fixture_module:dataset", "--eval_data", "cli_fixture_module:make_dataset",
           "--eval_every", "10", "--scaling.num_workers", "2", "--zero_stage", "2", "--steps", "30",
           "--global_batch_size", "16", "--optimizer.name", "adam", "--optimizer.lr", "0.05",
           "--run.out_dir", str(out), "--run.log_every", "10"]
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here)])}  # this checkout's distopt
    done = subprocess.run(cmd, cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == list(range(1, 31))
    assert lines[-1]["loss"] < lines[0]["loss"] / 4  # it learned
    assert [e["step"] for e in lines if "eval_loss" in e] == [10, 20, 30]
    assert lines[-1]["eval_samples"] == 64 and "held-out loss" in done.stdout
    assert (out / "loss.png").stat().st_size > 1000
    weights = read_safetensors(out / "model.safetensors")
    assert set(weights) == {"weight", "bias"} and weights["weight"].shape == torch.Size([1, 4])
