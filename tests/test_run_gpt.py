"""The ``make run`` job (launch/run_gpt.py), small: the held-out loss falls, files land in out/."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launch import gpt, run_gpt

pytestmark = pytest.mark.slow


def test_make_run_job_lowers_the_held_out_loss(ray_cluster, tmp_path, capsys):
    out = tmp_path / "gpt"
    assert run_gpt.main(["--out", str(out), "--steps", "30", "--layers", "1", "--embd", "32", "--block", "32",
                         "--batch-size", "32", "--max-bytes", "400000", "--eval-windows", "64",
                         "--sample-bytes", "16", "--lr", "1e-2", "--warmup", "5"]) == 0
    figures = json.loads((out / "gpt.json").read_text())
    # Byte-level: a fresh model is near uniform (ln 256 = 5.55 nats); 30 steps learn the byte frequencies at least.
    assert figures["heldout_loss_before"] > 5.0
    assert figures["heldout_loss_after"] < figures["heldout_loss_before"] - 1.5
    # ZeRO-1 over 2 workers: half of Adam's state each, plus the plan's alignment padding.
    assert figures["state_bytes_unsharded"] / 2 <= figures["state_bytes_per_worker"] <= \
        figures["state_bytes_unsharded"] / 2 + 1024
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "tokens/s" in printed and "sample" in printed
    assert len(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])) and (out / "loss.png").exists()
    weights = load_file(out / "model.safetensors")  # the model's own names, loadable without distopt
    model = gpt.GPT(gpt.GPTConfig(block_size=32, n_layer=1, n_embd=32))
    model.load_state_dict(weights)
    assert gpt.evaluate(model, gpt.datasets(32, 400000)[1], 64) == pytest.approx(figures["heldout_loss_after"])


def test_held_out_files_are_never_trained_on(tmp_path):
    for i in range(12):
        (tmp_path / f"m{i:02d}.py").write_bytes(bytes([65 + i]) * 100)
    train, held = gpt.split_text(gpt.stdlib_files(tmp_path))
    assert set(held.tolist()) == {65, 75} and 65 not in set(train.tolist()) and len(train) == 1000


def test_windows_are_shifted_pairs():
    data = gpt.ByteWindows(torch.arange(10, dtype=torch.uint8), block_size=3)
    assert len(data) == 3
    x, y = data[1]
    assert x.tolist() == [3, 4, 5] and y.tolist() == [4, 5, 6]
    with pytest.raises(IndexError):
        data[3]


def test_bad_model_size_names_the_field():
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        gpt.GPTConfig(n_embd=30)
