"""Shared pieces: statistics, goals, Markdown tables, machine facts, process pairs.

Only ratios measured side by side in one run are worth reporting on a small, noisy
machine, so every benchmark interleaves its contenders (A B A B ...) and keeps medians.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.multiprocessing as tmp

HERE = os.path.dirname(os.path.abspath(__file__))


def median(xs: Iterable[float]) -> float:
    """Median of ``xs`` (NaN when empty)."""
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(times: dict[int, float], marked: Sequence[int], before: int = 3) -> float:
    """Median over the ``marked`` steps of each one's time against the median of the
    ``before`` steps just ahead of it: each marked step meets its own neighbours, so the
    machine's drift over a run cancels. Marked steps without ``before`` timed predecessors
    are left out."""
    ratios = [times[s] / median(times[s - i] for i in range(1, before + 1)) for s in marked
              if all(s - i in times for i in range(1, before + 1))]
    return median(ratios)


def rotated(items: Sequence[Any], r: int) -> list[Any]:
    """``items`` rotated by ``r``: round ``r`` of an interleaved run starts with a different contender."""
    r %= max(1, len(items))
    return list(items[r:]) + list(items[:r])


def goal(name: str, value: float, limit: float, at_most: bool = True) -> dict:
    """A goal record: ``value <= limit`` (or ``>=``), whether it holds and the shortfall.

    The shortfall is relative: for an upper bound how far ``value`` is above it, for a
    lower bound how far below (0 when the goal holds).
    """
    holds = value <= limit if at_most else value >= limit
    short = 0.0 if holds else (value / limit - 1.0 if at_most else 1.0 - value / limit)
    return {"goal": name, "value": value, "limit": limit, "op": "<=" if at_most else ">=",
            "holds": bool(holds), "short_by": short}


def goal_row(g: dict) -> list[str]:
    """A goal as a Markdown table row: goal, measured, bound, holds, shortfall.

    Values within 0.1% of the bound get enough digits to show on which side they lie.
    """
    close = abs(g["value"] / g["limit"] - 1.0) < 1e-3 if g["limit"] else False
    value = f"{g['value']:.7f}" if close else f"{g['value']:.3f}"
    short = f"{100 * g['short_by']:.2g}%" if g["short_by"] < 1e-3 else f"{100 * g['short_by']:.1f}%"
    return [g["goal"], value, f"{g['op']} {g['limit']:g}", "yes" if g["holds"] else "**no**",
            "" if g["holds"] else short]


GOAL_HEADERS = ["goal", "measured", "bound", "holds", "short by"]


def goals_table(goals: Sequence[dict]) -> str:
    """Goal records as a Markdown table."""
    return md_table(GOAL_HEADERS, [goal_row(g) for g in goals])


def run_alone(doc: str, quick_help: str, run: Callable[[bool], dict]) -> dict:
    """A benchmark started on its own (``python -m benchmarks.bench_x [--quick]``): its result."""
    import argparse
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    return run(p.parse_args().quick)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table for the terminal."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_goals(goals: Sequence[dict]) -> None:
    """Print goal records as a terminal table."""
    print(text_table(GOAL_HEADERS, [goal_row(g) for g in goals]))


def machine_facts() -> dict:
    """Date, cores, CPU model, memory and library versions, for RESULTS.md."""
    import numpy
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    facts = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
             "cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_gib, 1),
             "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
             "os": f"{platform.system()} {platform.release()}"}
    try:
        import ray
        facts["ray"] = ray.__version__
    except ImportError:
        facts["ray"] = "not installed"
    return facts


def git_state() -> dict:
    """The commit measured, the files under ``distopt/`` that differ from it, and a digest
    of those differences (two states with equal digests ran the same code)."""
    import hashlib
    import subprocess
    root = os.path.dirname(HERE)

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "distopt").splitlines()]
    digest = hashlib.sha1(git("diff", "HEAD", "--", "distopt").encode())
    for path in git("ls-files", "--others", "--exclude-standard", "--", "distopt").splitlines():
        try:
            with open(os.path.join(root, path), "rb") as f:
                digest.update(f.read())
        except OSError:
            pass
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown", "dirty": dirty,
            "diff_sha1": digest.hexdigest()[:12]}


def norm_accumulation() -> str:
    """``"float64"`` when ``distopt.optim.norm.global_norm`` runs ``_foreach_norm`` in double
    precision (the code as measured), else ``"float32"``."""
    import inspect
    import re

    from distopt.optim.norm import global_norm
    source = inspect.getsource(global_norm)
    return "float64" if re.search(r"_foreach_norm\([^)]*float64", source) else "float32"


def bucket_count() -> int:
    """Buckets of the step benchmark's MLP as the runtime plans them (named parameters, stage 1)."""
    import distopt
    from benchmarks.step_ranks import make_model
    from distopt.collectives import in_process
    from distopt.optim import ShardedOptimizer
    comm = in_process(1)[0]
    opt = ShardedOptimizer(dict(make_model().named_parameters()), distopt.optim.adam(lr=1e-3), comm, zero_stage=1)
    return len(opt.plan.layout.buckets)


class ProcessPair:
    """``world`` spawned processes (torch.multiprocessing), each with a command queue.

    ``target(rank, world, cmd_queue, result_queue, *args)`` loops on its queue until it
    gets ``None``. :meth:`call` sends one command to every rank and waits for all answers.
    """

    def __init__(self, target: Callable, args: tuple = (), world: int = 2, timeout_s: float = 600.0) -> None:
        ctx = tmp.get_context("spawn")
        self.timeout_s = timeout_s
        self.results = ctx.Queue()
        self.cmds = [ctx.Queue() for _ in range(world)]
        self.procs = [ctx.Process(target=target, args=(r, world, self.cmds[r], self.results, *args), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def call(self, cmd: Any) -> list[Any]:
        """Send ``cmd`` to every rank; return their answers in rank order.

        Raises:
            RuntimeError: a rank answered with an exception (its text) or died.
        """
        for q in self.cmds:
            q.put(cmd)
        answers = {}
        for _ in self.cmds:
            rank, value = self.results.get(timeout=self.timeout_s)
            if isinstance(value, BaseException) or (isinstance(value, str) and value.startswith("ERROR")):
                self.close()
                raise RuntimeError(f"rank {rank} failed: {value}")
            answers[rank] = value
        return [answers[r] for r in range(len(self.cmds))]

    def close(self) -> None:
        """Ask every rank to stop, then make sure it has."""
        for q in self.cmds:
            try:
                q.put(None)
            except Exception:  # the queue may already be broken
                pass
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def serve(rank: int, cmds, results, handle: Callable[[Any], Any]) -> None:
    """A rank's command loop: answer each command with ``handle(cmd)`` until ``None``."""
    import traceback
    while True:
        cmd = cmds.get()
        if cmd is None:
            return
        try:
            results.put((rank, handle(cmd)))
        except Exception:
            results.put((rank, "ERROR " + traceback.format_exc()))
            return
