"""Benchmark 4b, peak resident memory per worker: distopt against DDP, ZeRO and FSDP2.

One run, everything side by side: an MLP of 8 x ``nn.Linear(2048, 2048)`` (33.6M parameters;
``--quick``: 8 x ``Linear(512, 512)``), 2 workers, gloo on 127.0.0.1, ``Adam(lr=1e-3)``, a few
steps of 8 random samples per worker. Each configuration starts its 2 ranks as fresh
processes (``benchmarks.peak_memory_ranks``, glibc's mmap threshold fixed), one configuration
after another; each rank reports its peak resident set (``VmHWM``) minus that of a bare
worker: the same kind of process (torch peer or distopt ``Worker``) on a tiny model, measured
first in the same run. Imports, torch, gloo and the runtime's fixed cost cancel. Reported:
the maximum over ranks, in MB (1e6 B).

Configurations: DDP + ``torch.optim.Adam``; DDP + ``ZeroRedundancyOptimizer(Adam)``; FSDP2
``fully_shard`` (each Linear, then the root) with ``reshard_after_forward`` False and True, +
``torch.optim.Adam``; the distopt runtime's ``Worker`` (no Ray) at zero_stage 0, 1 and 2 with
``max_failures=0`` and with the default fault tolerance (``max_failures=3``). Goals (DESIGN.md,
P parameters, N workers, B the default bucket cap): stage 1 <= 1.1 (4P + 4P + 8P/N) + 2B,
stage 2 <= 1.1 (4P + 12P/N) + 2B, the redundancy (max_failures=3 minus 0) <= 24P/N.

Run alone: ``python -m benchmarks.bench_peak_memory [--quick]``.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import goal, goals_table, md_table, print_goals, run_alone, text_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD, LAYERS, BATCH = 2, 8, 8
WIDTH, QUICK_WIDTH, TINY_WIDTH = 2048, 512, 16
# Steps: torch's state is complete after the first; distopt's run past a few commits, so the
# fault tolerance's replica has been replayed (and the neighbour's gradients read) several times.
STEPS = {"torch": 3, "distopt": 6}
COLLECTIVE_TIMEOUT_S = 60
LAUNCH_TIMEOUT_S = 300.0
# glibc's default mmap threshold rises to the size of the last large block freed, after which
# 16 MB tensors come from the heap and fragment it: a rank's peak then moved by up to 100 MB
# between ranks and runs of the same configuration (DDP: 1,059-1,161 MB raw). A fixed
# threshold maps every block over 64 KiB on its own and returns it when freed: the peak of
# what the process holds, the same to 1 MB from run to run (DDP: 1,035-1,036 MB raw).
RANK_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
PEERS = ["ddp", "zero", "fsdp-r0", "fsdp-r1"]
DISTOPT = [f"distopt-s{stage}-f{failures}" for stage in (0, 1, 2) for failures in (0, 3)]
BARE = {"torch": "ddp", "distopt": "distopt-s1-f0"}  # each kind's bare worker: this config, tiny model
LABELS = {"ddp": "DDP + torch.optim.Adam", "zero": "DDP + ZeroRedundancyOptimizer(Adam)",
          "fsdp-r0": "FSDP2, reshard_after_forward=False + Adam", "fsdp-r1": "FSDP2, reshard_after_forward=True + Adam"}
MB = 1e6


def label(config: str) -> str:
    """Human name of a configuration key such as ``fsdp-r1`` or ``distopt-s2-f3``."""
    if config in LABELS:
        return LABELS[config]
    _, stage, failures = config.split("-")
    return f"distopt Worker, stage {stage[1:]}, max_failures={failures[1:]}"


def kind(config: str) -> str:
    """Which bare worker a configuration is measured against."""
    return "distopt" if config.startswith("distopt") else "torch"


def launch(config: str, width: int) -> list[dict]:
    """Both ranks of ``config`` on ``width``-wide layers, as fresh processes; their reports in rank order.

    Raises:
        RuntimeError: a rank failed or ran past ``LAUNCH_TIMEOUT_S`` (the end of its stderr).
    """
    from distopt.collectives import free_port
    spec = {"config": config, "world": WORLD, "port": free_port(), "layers": LAYERS, "width": width,
            "steps": STEPS[kind(config)], "batch": BATCH, "timeout_s": COLLECTIVE_TIMEOUT_S}
    env = {**os.environ, **RANK_ENV}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as files:
        logs = [tuple(files.enter_context(open(os.path.join(tmp, f"{r}.{x}"), "w+")) for x in ("out", "err"))
                for r in range(WORLD)]
        command = [sys.executable, "-m", "benchmarks.peak_memory_ranks"]
        procs = [subprocess.Popen(command + [json.dumps({**spec, "rank": r})], cwd=ROOT, env=env, stdout=out,
                                  stderr=err) for r, (out, err) in enumerate(logs)]
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        except subprocess.TimeoutExpired:
            codes = [None] * WORLD
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return [_report(r, code, out, err) for r, (code, (out, err)) in enumerate(zip(codes, logs))]


def _report(rank: int, code: int | None, out, err) -> dict:
    """A rank's JSON line, or a RuntimeError with the last line of its stderr."""
    out.seek(0)
    err.seek(0)
    lines = out.read().strip().splitlines()
    if code == 0 and lines:
        return json.loads(lines[-1])
    tail = [ln for ln in err.read().strip().splitlines() if ln.strip()][-1:] or ["no output"]
    why = "timed out" if code is None else f"exit {code}"
    raise RuntimeError(f"rank {rank} {why}: {tail[0][:400]}")


def _bare_workers(errors: dict) -> dict[str, list[dict]]:
    """Each kind's bare worker (the tiny model): its ranks' reports."""
    out = {}
    for k, config in BARE.items():
        try:
            out[k] = launch(config, TINY_WIDTH)
        except RuntimeError as e:
            errors[f"bare {k} worker"] = str(e)
    return out


def peak_row(ranks: list[dict], bare: list[dict]) -> dict:
    """Per rank, its peak minus its bare worker's, in MB."""
    def over(phase: str) -> list[float]:
        return [(r[phase] - b[phase]) / MB for r, b in zip(ranks, bare)]
    trained, built = over("trained"), over("built")
    return {"peak_mb": max(trained), "per_rank_mb": trained, "built_mb": max(built)}


def formulas(num_params: int, bucket_bytes: int) -> list[dict]:
    """ZeRO's per-worker memory and the goals' bounds, bytes (fp32, Adam)."""
    p, n, b = num_params, WORLD, bucket_bytes
    stage1, stage2 = 4 * p + 4 * p + 8 * p / n, 4 * p + 12 * p / n
    return [{"name": "unsharded (stage 0): 4P + 4P + 8P", "bytes": 16 * p},
            {"name": "ZeRO stage 1: 4P + 4P + 8P/N", "bytes": stage1},
            {"name": "ZeRO stage 2: 4P + 12P/N", "bytes": stage2},
            {"name": "bound, stage 1: 1.1 (4P + 4P + 8P/N) + 2B", "bytes": 1.1 * stage1 + 2 * b, "goal": 1},
            {"name": "bound, stage 2: 1.1 (4P + 12P/N) + 2B", "bytes": 1.1 * stage2 + 2 * b, "goal": 2},
            {"name": "bound, redundancy (max_failures=3 minus 0): 24P/N", "bytes": 24 * p / n, "goal": "ft"}]


def goals_of(result: dict) -> list[dict]:
    """Stage 1 and 2 at max_failures=0 against ZeRO's bounds; the redundancy on top at each."""
    rows, p = result["rows"], result["num_params"]
    bound = {f["goal"]: f["bytes"] / MB for f in result["formulas"] if "goal" in f}
    where = f"P={p:,}, N={WORLD}"
    out = [goal(f"peak memory over bare worker (MB), distopt stage {s}, max_failures=0, {where}",
                rows[f"distopt-s{s}-f0"]["peak_mb"], bound[s]) for s in (1, 2) if f"distopt-s{s}-f0" in rows]
    out += [goal(f"peak memory of the redundancy (MB), stage {s}, max_failures=3 minus 0, {where}",
                 rows[f"distopt-s{s}-f3"]["peak_mb"] - rows[f"distopt-s{s}-f0"]["peak_mb"], bound["ft"])
            for s in (1, 2) if f"distopt-s{s}-f3" in rows and f"distopt-s{s}-f0" in rows]
    return out


def run(quick: bool = False) -> dict:
    """Bare workers, then every configuration; returns rows, formulas and goals."""
    from benchmarks.peak_memory_ranks import make_model
    from distopt.collectives import DEFAULT_BUCKET_BYTES
    width = QUICK_WIDTH if quick else WIDTH
    num_params = sum(t.numel() for t in make_model(LAYERS, width).parameters())
    raw, rows, errors = {}, {}, {}
    bare = _bare_workers(errors)
    for config in PEERS + DISTOPT:
        t0 = time.perf_counter()
        try:
            raw[config] = launch(config, width)
        except RuntimeError as e:
            errors[config] = str(e)
            print(f"  {config}: failed: {e}", flush=True)
            continue
        print(f"  {config}: peak {max(r['trained'] for r in raw[config]) / MB:,.0f} MB "
              f"raw ({time.perf_counter() - t0:.0f} s)", flush=True)
    for config, ranks in raw.items():
        if kind(config) in bare:
            rows[config] = peak_row(ranks, bare[kind(config)])
    result = {"num_params": num_params, "world": WORLD, "layers": LAYERS, "width": width, "tiny_width": TINY_WIDTH,
              "steps": STEPS, "batch_per_worker": BATCH, "bucket_bytes": DEFAULT_BUCKET_BYTES, "env": RANK_ENV,
              "bare": bare, "raw": raw, "rows": rows, "errors": errors,
              "formulas": formulas(num_params, DEFAULT_BUCKET_BYTES)}
    return {**result, "goals": goals_of(result)}


HEADERS = ["configuration", "peak MB over bare worker (max over ranks)", "rank 0", "rank 1", "B / parameter",
           "after build MB", "x DDP"]


def table_rows(result: dict) -> list[list[str]]:
    """One row per configuration that ran."""
    rows, p = result["rows"], result["num_params"]
    ddp = rows.get("ddp", {}).get("peak_mb")
    return [[label(c), f"{r['peak_mb']:,.1f}", *(f"{x:,.1f}" for x in r["per_rank_mb"]),
             f"{r['peak_mb'] * MB / p:.2f}", f"{r['built_mb']:,.1f}", f"{r['peak_mb'] / ddp:.3f}" if ddp else ""]
            for c, r in rows.items()]


def formula_rows(result: dict) -> list[list[str]]:
    """ZeRO's formulas and the goals' bounds, in MB and bytes per parameter."""
    return [[f["name"], f"{f['bytes'] / MB:,.1f}", f"{f['bytes'] / result['num_params']:.2f}"]
            for f in result["formulas"]]


def bare_rows(result: dict) -> list[list[str]]:
    """The bare workers' own VmHWM per rank (MB), what every row above subtracts."""
    return [[k, *(f"{r['trained'] / MB:,.1f}" for r in ranks)] for k, ranks in result["bare"].items()]


def markdown(result: dict) -> str:
    """The RESULTS.md section."""
    p, w = result["num_params"], result["width"]
    steps, tiny = result["steps"], result["tiny_width"]
    return "\n\n".join([
        f"{result['layers']} x `nn.Linear({w}, {w})` with ReLU between (P = {p:,}), N = {result['world']} workers, "
        f"gloo on 127.0.0.1, Adam(lr=1e-3), {result['batch_per_worker']} random samples per worker and step; "
        f"{steps['torch']} steps for the torch peers (their state is complete after the first), {steps['distopt']} "
        f"for distopt (past several commits, each replaying the neighbour's update onto the replica that the fault "
        f"tolerance keeps in the neighbour's shared memory). Each configuration runs as 2 fresh processes, one configuration after another. A rank's figure "
        f"is its peak resident set (`VmHWM`, which counts the pages of `/dev/shm` files it touched: shared memory "
        f"counts in every process touching it) minus its bare worker's: the same process (torch peer: DDP + Adam; "
        f"distopt: `Worker` at stage 1, max_failures=0) on {result['layers']} x `Linear({tiny}, {tiny})`, run "
        f"first. `after build` is the same at the end of construction (model, wrapper, optimizer), before the "
        f"first step. Ranks run with `MALLOC_MMAP_THRESHOLD_=65536` (every block over 64 KiB mapped on its own "
        f"and returned when freed): with glibc's default, rising threshold, heap fragmentation moved a rank's peak "
        f"by up to 100 MB from run to run. MB = 1e6 bytes; B = {result['bucket_bytes']:,} (distopt's default "
        f"bucket cap). Peers use torch's defaults (DDP's 25 MB gradient buckets are a copy of the gradients, "
        f"`gradient_as_bucket_view=False`); distopt uses TrainConfig's defaults.",
        md_table(HEADERS, table_rows(result)),
        md_table(["reference (fp32, Adam)", "MB", "B / parameter"], formula_rows(result)),
        "Bare workers' own peak (MB), what the rows above subtract:",
        md_table(["bare worker", "rank 0", "rank 1"], bare_rows(result)),
        goals_table(result["goals"]),
    ] + [f"**{label(c) if c in LABELS or c.startswith('distopt') else c} failed**: `{e}`"
         for c, e in result["errors"].items()])


def main() -> None:
    result = run_alone(__doc__, f"8 x Linear({QUICK_WIDTH}, {QUICK_WIDTH}) instead of 2048 (a smoke run)", run)
    print(text_table(HEADERS, table_rows(result)))
    print(text_table(["reference (fp32, Adam)", "MB", "B / parameter"], formula_rows(result)))
    print(text_table(["bare worker", "rank 0", "rank 1"], bare_rows(result)))
    print_goals(result["goals"])
    for c, e in result["errors"].items():
        print(f"{c} failed: {e}")


if __name__ == "__main__":
    main()
