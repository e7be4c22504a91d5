"""RunLog: what the driver shows and keeps of a run, one history entry per step.

Per step it appends a line to ``out_dir/metrics.jsonl`` (flushed, so a crashed or killed
run keeps every step it finished), moves a ``tqdm`` progress bar on a terminal, or prints
a plain line every ``log_every`` steps where stderr is a file or a pipe (a redrawn bar
would fill a log with carriage returns). A record that carries evaluation metrics (keys
starting with ``eval_``) is shown as soon as it arrives, and the bar keeps its latest
values. At the end it writes ``summary.json`` and a loss plot. Driver only; no Ray.
"""
from __future__ import annotations

import collections
import datetime
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Mapping, TextIO

from tqdm import tqdm

RECENT = 20  # steps averaged for the plain lines' rate and ETA: recent, so the slow first step fades
REDRAW_S = 0.1  # at most ten bar redraws a second, however fast the steps are
EVAL_PREFIX = "eval_"  # evaluation metrics: shown whenever a record carries them
STANDARD_KEYS = ("step", "loss", "time_s", "committed_at", "samples_per_s", "data_s", "compute_s", "comm_s", "update_s",
                 "grad_norm", "skipped", "eval_samples", "eval_s")  # (the last two: in metrics.jsonl only)


class RunLog:
    """Records a run's history on the driver: JSONL, progress display, summary and plot.

    Args:
        total_steps: steps the run will take (for the bar and the ETA).
        global_batch_size: samples per step (for samples/s where an entry lacks it).
        out_dir: folder for ``metrics.jsonl``, ``summary.json`` and ``loss.png``; created if
            missing, and an existing ``metrics.jsonl`` there is replaced. None: no files.
        log_every: plain-line period when there is no bar; 0 prints nothing.
        show_bar: True/False, or None for a bar only when stderr is a terminal.
        stream: where the bar and lines go (default ``sys.stderr`` at each write).

    Raises:
        ValueError: a negative step count, batch size or log period.
    """

    def __init__(self, total_steps: int, global_batch_size: int, out_dir: str | None, log_every: int,
                 show_bar: bool | None, stream: TextIO | None = None) -> None:
        _check_count("total_steps", total_steps, 0)
        _check_count("global_batch_size", global_batch_size, 1)
        _check_count("log_every", log_every, 0)
        self.total_steps, self.global_batch_size, self.log_every = total_steps, global_batch_size, log_every
        self.out_dir = out_dir
        self._stream = stream
        self.show_bar = _isatty(self._out()) if show_bar is None else bool(show_bar)
        self.entries: list[dict] = []
        self._recent: collections.deque = collections.deque(maxlen=RECENT)
        self._last_record = time.monotonic()
        self._evals: dict[str, Any] = {}  # the latest evaluation metrics, kept on the bar
        self._loss: Any = None  # the latest training loss, kept on the bar through evaluation records
        self._summary: dict | None = None
        self._jsonl = None
        self._bar: tqdm | None = None
        if self.show_bar:
            self._bar = tqdm(total=total_steps, file=self._out(), unit="step", mininterval=REDRAW_S,
                             dynamic_ncols=True, leave=True, desc="step")
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "w", encoding="utf-8")

    def _out(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def record(self, entry: Mapping[str, Any]) -> None:
        """Keep one step's history entry, write it to the JSONL file and update the display.

        Args:
            entry: a dict with at least ``step``, and ``loss`` for a training step; ``time_s``
                (the step's wall time) is measured here when absent. Tensor and NumPy
                scalars are stored as numbers.
        """
        if self._summary is not None:
            raise RuntimeError("RunLog.record() after close(): make a new RunLog for a new run")
        now = time.monotonic()
        entry = {k: _plain(v) for k, v in entry.items()}
        entry.setdefault("time_s", now - self._last_record)
        self._last_record = now
        self.entries.append(entry)
        if "loss" in entry:  # a training step; an evaluation-only record says nothing of the step rate
            self._recent.append(float(entry["time_s"]))
            self._loss = entry["loss"]
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(entry, default=str) + "\n")
            self._jsonl.flush()
        self._display(entry)

    def rewind(self, step: int) -> None:
        """Forget the entries after ``step`` (the run went back to a checkpoint and redoes
        them); ``metrics.jsonl`` is rewritten to match."""
        self.entries = [e for e in self.entries if int(e["step"]) <= step]
        if self._bar is not None:
            self._bar.n = sum(1 for e in self.entries if "loss" in e)
            self._bar.refresh()
        if self._jsonl is not None:
            self._jsonl.seek(0)
            self._jsonl.truncate()
            for e in self.entries:
                self._jsonl.write(json.dumps(e, default=str) + "\n")
            self._jsonl.flush()

    def _display(self, entry: dict) -> None:
        step = int(entry["step"])
        evals = {k: v for k, v in entry.items()
                 if k.startswith(EVAL_PREFIX) and k not in STANDARD_KEYS and _is_number(v)}
        self._evals.update(evals)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            # Counted in steps done by this run (a resumed run's step numbers start past 0);
            # an evaluation-only record adds none.
            self._bar.update(1 if "loss" in entry else 0)
            if evals:
                self._bar.refresh()
        elif self.log_every and (step % self.log_every == 0 or step >= self.total_steps or evals):
            self._out().write(self._line(entry) + "\n")
            self._out().flush()

    def _postfix(self) -> str:
        """The bar's tail: the step's loss, the latest evaluation metrics, samples/s."""
        parts = [f"loss {_num(self._loss)}"] + [f"{k} {_num(v)}" for k, v in self._evals.items()]
        samples_s = self._rates()[1]
        return "  ".join(parts + [f"{samples_s:,.0f} samples/s"])

    def _rates(self) -> tuple[float, float, float]:
        """Recent seconds per step, samples per second, and seconds left."""
        step_s = sum(self._recent) / len(self._recent) if self._recent else 0.0
        done = int(self.entries[-1]["step"])
        left = max(0, self.total_steps - done) * step_s
        return step_s, (self.global_batch_size / step_s if step_s > 0 else 0.0), left

    def _line(self, entry: dict) -> str:
        step_s, samples_s, left = self._rates()
        parts = [f"step {int(entry['step'])}/{self.total_steps}"]
        if "loss" in entry:
            parts.append(f"loss {_num(entry['loss'])}")
        if entry.get("grad_norm") is not None:
            parts.append(f"grad_norm {_num(entry['grad_norm'])}")
        parts += [f"{k} {_num(v)}" for k, v in entry.items() if k not in STANDARD_KEYS and _is_number(v)]
        parts += [f"{samples_s:,.0f} samples/s", f"{step_s:.3f} s/step", f"ETA {_clock(left)}"]
        return "  ".join(parts)

    def close(self, extra: Mapping[str, Any] | None = None) -> dict:
        """End the run: finish the display, write ``summary.json`` and ``loss.png``.

        Calling it again returns the same summary and writes nothing.

        Args:
            extra: more summary fields (e.g. the Trainer's optimizer-state bytes), merged
                in before ``summary.json`` is written.

        Returns:
            ``{steps, first_loss, last_loss, mean_step_s, steps_per_s, samples_per_s}``
            plus ``extra``; figures are None for a run that recorded no step.
        """
        if self._summary is not None:
            return dict(self._summary)
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._summary = {**summarize(self.entries, self.global_batch_size), **dict(extra or {})}
        if self.out_dir is not None:
            with open(os.path.join(self.out_dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump({k: _plain(v) for k, v in self._summary.items()}, f, indent=2, default=str)
                f.write("\n")
            plot_loss(self.entries, os.path.join(self.out_dir, "loss.png"))
        return dict(self._summary)


def summarize(entries: list[dict], global_batch_size: int) -> dict:
    """Summary figures of a history: losses at both ends and the mean step rate."""
    if not entries:
        return {"steps": 0, "first_loss": None, "last_loss": None,
                "mean_step_s": None, "steps_per_s": None, "samples_per_s": None}
    mean_step_s = sum(float(e["time_s"]) for e in entries) / len(entries)
    rate = 1.0 / mean_step_s if mean_step_s > 0 else None
    return {"steps": len(entries), "first_loss": entries[0].get("loss"), "last_loss": entries[-1].get("loss"),
            "mean_step_s": mean_step_s, "steps_per_s": rate,
            "samples_per_s": rate * global_batch_size if rate is not None else None}


def plot_loss(entries: list[dict], path: str) -> bool:
    """Write a loss-vs-step PNG to ``path``; False (with a warning) when it cannot.

    Uses matplotlib's Agg canvas directly rather than pyplot, so the caller's own
    matplotlib backend (a notebook's, say) is left as it was.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(f"matplotlib is not installed, so {path} was not drawn: pip install matplotlib", stacklevel=2)
        return False
    points = [(e["step"], e["loss"]) for e in entries
              if isinstance(e.get("loss"), (int, float)) and math.isfinite(e["loss"])]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, linewidth=0.8, color="tab:blue", alpha=0.45, label="per step")
        window = max(5, len(losses) // 25)
        if len(losses) >= 4 * window:  # a trend line only where there are points enough to average
            ax.plot(steps[window - 1:], _moving_mean(losses, window), linewidth=1.8, color="tab:blue",
                    label=f"mean of {window}")
            ax.legend(loc="upper right")
        if all(v > 0 for v in losses):
            ax.set_yscale("log")  # losses fall over decades; a linear axis flattens all but the start
    else:
        ax.text(0.5, 0.5, "no finite loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Training loss ({len(entries)} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def _moving_mean(values: tuple[float, ...], window: int) -> list[float]:
    out, total = [], sum(values[:window - 1])
    for i in range(window - 1, len(values)):
        total += values[i]
        out.append(total / window)
        total -= values[i - window + 1]
    return out


def _plain(value: Any) -> Any:
    """A JSON-ready value: tensors and NumPy scalars or arrays become numbers or lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars alike
        return value.tolist()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: Any) -> str:
    """A metric as shown: integers as they are, other numbers with 4 decimals or in e-notation."""
    if not _is_number(value):
        return "-"
    if isinstance(value, int):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
