"""RunLog: JSONL history, progress display, summary figures, loss plot. No Ray."""
from __future__ import annotations

import io
import json

import pytest
import torch

from distopt.runtime.progress import RunLog, summarize


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def entries(n: int, batch: int = 64) -> list[dict]:
    """``n`` made-up steps: loss halving, 0.5 s each, one user metric."""
    return [{"step": k, "loss": 2.0 ** -k, "time_s": 0.5, "samples_per_s": batch / 0.5, "compute_s": 0.3,
             "comm_s": 0.1, "update_s": 0.1, "grad_norm": 1.0 / k, "acc": k / n} for k in range(1, n + 1)]


def run(log: RunLog, n: int, batch: int = 64) -> dict:
    for e in entries(n, batch):
        log.record(e)
    return log.close()


def test_jsonl_has_one_line_per_step_with_every_key(tmp_path):
    out = tmp_path / "new" / "run"  # missing folders are created
    log = RunLog(5, 64, str(out), log_every=0, show_bar=False, stream=io.StringIO())
    log.record({"step": 1, "loss": torch.tensor(0.75), "time_s": 0.5, "acc": torch.tensor([0.5])})
    # Flushed per line: a run killed now keeps the step it finished.
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 1, "loss": 0.75, "time_s": 0.5, "acc": [0.5]}
    for e in entries(5)[1:]:
        log.record(e)
    log.close()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert lines[1] == entries(5)[1]


def test_summary_math_and_files(tmp_path):
    log = RunLog(4, 32, str(tmp_path), log_every=0, show_bar=False, stream=io.StringIO())
    for k, t in enumerate([1.0, 0.5, 0.5, 0.5], start=1):
        log.record({"step": k, "loss": 4.0 / k, "time_s": t})
    summary = log.close(extra={"state_bytes_per_worker": 100})
    assert summary == {"steps": 4, "first_loss": 4.0, "last_loss": 1.0, "mean_step_s": 0.625,
                       "steps_per_s": 1.6, "samples_per_s": pytest.approx(51.2), "state_bytes_per_worker": 100}
    assert json.loads((tmp_path / "summary.json").read_text()) == pytest.approx(summary)
    assert log.close() == summary  # a second close writes nothing new and answers the same


def test_loss_png_is_written(tmp_path):
    run(RunLog(30, 64, str(tmp_path), log_every=0, show_bar=False, stream=io.StringIO()), 30)
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_plot_survives_nonfinite_and_negative_losses(tmp_path):
    log = RunLog(3, 8, str(tmp_path), log_every=0, show_bar=False, stream=io.StringIO())
    for k, loss in enumerate([float("nan"), -1.0, 0.5], start=1):
        log.record({"step": k, "loss": loss, "time_s": 0.1})
    log.close()
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_no_output_when_log_every_is_zero_and_no_tty():
    stream = io.StringIO()  # not a terminal: show_bar=None picks no bar
    log = RunLog(20, 64, None, log_every=0, show_bar=None, stream=stream)
    assert log.show_bar is False
    run(log, 20)
    assert stream.getvalue() == ""


def test_plain_lines_every_log_every_steps_and_at_the_end():
    stream = io.StringIO()
    run(RunLog(25, 64, None, log_every=10, show_bar=None, stream=stream), 25)
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["10/25", "20/25", "25/25"]
    assert "\r" not in stream.getvalue()
    assert "acc 0.4000" in lines[0] and "128 samples/s" in lines[0] and "ETA 0:00:08" in lines[0]


def test_bar_on_a_terminal_redraws_one_line():
    stream = FakeTTY()
    log = RunLog(40, 64, None, log_every=10, show_bar=None, stream=stream)
    assert log.show_bar is True
    run(log, 40)
    text = stream.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
    final = text.rstrip("\n").split("\r")[-1]
    assert final.startswith("step: 100%") and "40/40" in final
    assert final.rstrip().endswith("loss 9.095e-13  128 samples/s]")


def test_integers_show_as_integers():
    stream = io.StringIO()
    log = RunLog(2, 64, None, log_every=1, show_bar=False, stream=stream)
    log.record({"step": 1, "loss": 0.5, "time_s": 0.5, "world_size": 2, "tokens": 4096, "acc": 1.0})
    line = stream.getvalue()
    assert "world_size 2  " in line and "tokens 4096  " in line and "acc 1.0000" in line


def test_evaluation_metrics_show_when_a_record_carries_them():
    stream = io.StringIO()
    log = RunLog(30, 64, None, log_every=10, show_bar=False, stream=stream)
    for e in entries(30)[:7]:
        log.record(e)
    log.record({"step": 7, "eval_loss": 1.25, "eval_samples": 512})  # off the log period: printed all the same
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("step 7/30  eval_loss 1.2500  128 samples/s")  # eval_samples: jsonl only
    tty = FakeTTY()
    bar = RunLog(30, 64, None, log_every=10, show_bar=True, stream=tty)
    for e in entries(30)[:7]:
        bar.record(e)
    bar.record({"step": 7, "eval_loss": 1.25})
    bar.record(entries(30)[7])
    assert bar._bar.n == 8  # the evaluation record moved the bar by no step
    bar.close()
    assert "loss 0.0039  eval_loss 1.2500  128 samples/s" in tty.getvalue().split("\r")[-1]
    assert "step 7/30  eval_loss" not in tty.getvalue()  # a bar, not plain lines


def test_summary_of_an_empty_run(tmp_path):
    summary = RunLog(10, 8, str(tmp_path), log_every=0, show_bar=False, stream=io.StringIO()).close()
    assert summary["steps"] == 0 and summary["first_loss"] is None and summary["samples_per_s"] is None
    assert (tmp_path / "summary.json").exists() and (tmp_path / "loss.png").exists()


def test_summarize_is_pure():
    s = summarize(entries(4), 64)
    assert s["steps"] == 4 and s["mean_step_s"] == 0.5 and s["steps_per_s"] == 2.0 and s["samples_per_s"] == 128


@pytest.mark.parametrize("kwargs, match", [
    ({"total_steps": -1}, "total_steps=-1 must be an int >= 0"),
    ({"global_batch_size": 0}, "global_batch_size=0 must be an int >= 1"),
    ({"log_every": -5}, "log_every=-5 must be an int >= 0"),
])
def test_bad_arguments(kwargs, match):
    args = {"total_steps": 10, "global_batch_size": 8, "out_dir": None, "log_every": 1, "show_bar": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        RunLog(**args)


def test_record_after_close_is_refused():
    log = RunLog(2, 8, None, 0, False, stream=io.StringIO())
    log.close()
    with pytest.raises(RuntimeError, match="make a new RunLog"):
        log.record({"step": 1, "loss": 1.0})


def test_rewind_forgets_later_steps_in_memory_and_on_disk(tmp_path):
    log = RunLog(6, 64, str(tmp_path), log_every=0, show_bar=False, stream=io.StringIO())
    steps = entries(6)
    for e in steps[:5]:
        log.record(e)
    log.rewind(2)  # back to a checkpoint after step 2: steps 3.. are redone
    for e in steps[2:]:
        log.record(e)
    summary = log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in log.entries] == [1, 2, 3, 4, 5, 6]
    assert summary["steps"] == 6


def test_bar_counts_steps_of_this_run_through_a_rewind():
    log = RunLog(4, 64, None, log_every=0, show_bar=True, stream=FakeTTY())
    steps = [dict(e, step=e["step"] + 100) for e in entries(4)]  # resumed at step 100
    for e in steps[:3]:
        log.record(e)
    log.rewind(101)
    assert log._bar.n == 1
    for e in steps[1:]:
        log.record(e)
    assert log._bar.n == 4 == log._bar.total
    log.close()
