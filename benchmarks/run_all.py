"""Run every benchmark and write ``benchmarks/RESULTS.md`` with its pictures.

    python -m benchmarks.run_all            # everything (make bench), ~17 minutes on 2 cores
    python -m benchmarks.run_all --quick    # a smoke run, a few minutes
    python -m benchmarks.run_all --only step --only faults
    python -m benchmarks.run_all --only compile    # the GPT's step, eager against torch.compile

Results accumulate in ``benchmarks/results.json``: ``--only`` refreshes the named
benchmarks and keeps the others' last results (each section says which command and date
produced it). Nothing here asserts a goal; every goal's status is written down.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import bench_collectives, bench_memory, bench_step, bench_update, cost_model, plots
from benchmarks.common import (HERE, bucket_count, git_state, goal_row, goals_table, machine_facts, md_table,
                               norm_accumulation)

# Run order (the cost model's check needs step, collectives and update first). "faults" is
# the fault-tolerance benchmark (bench_faults.py, Ray Train's TorchTrainer as the peer);
# "peak_memory" is bench_peak_memory.py (each configuration's ranks as fresh processes);
# "muon" is bench_muon.py, "recipes" bench_recipes.py; "compile" is bench_compile.py (the
# make-run GPT's step, eager against torch.compile); "data" is bench_data.py (background
# loading against torch's DataLoader, shard read throughput).
ORDER = ["update", "collectives", "memory", "peak_memory", "step", "muon", "recipes", "faults", "precision", "compile",
         "data", "scale", "gpu", "gpu_gpt"]
DEFAULT = list(ORDER)
SECTIONS = ["step", "collectives", "update", "memory", "peak_memory", "muon", "recipes", "faults", "precision",
            "compile", "data", "scale", "gpu", "gpu_gpt"]
MODULES = {"update": bench_update, "collectives": bench_collectives, "memory": bench_memory, "step": bench_step}
TITLES = {"step": "1. Step time", "collectives": "2. The allreduce layer", "update": "3. The update kernel",
          "memory": "4. Memory and traffic", "peak_memory": "4b. Peak resident memory per worker",
          "muon": "5. Muon sharded by whole matrices",
          "recipes": "5b. Recipes on the GPT: AdamW, decay groups, Muon + AdamW",
          "faults": "Fault tolerance (recovery, overhead, checkpoints)",
          "precision": "Mixed precision: the demo's loss curve", "compile": "torch.compile: the GPT's step",
          "data": "Data loading: background loaders and shard reads", "scale": "6. Scale: the cost model",
          "gpu": "GPU: update kernel, NCCL, one-GPU step, mixed precision",
          "gpu_gpt": "GPU: a GPT-2-small-sized step against fused AdamW, and peak memory per rank"}
RESULTS_JSON = os.path.join(HERE, "results.json")


def _module(name: str):
    """The benchmark module of ``name``; bench_faults is imported only when it runs or is shown."""
    if name not in MODULES:
        import importlib
        MODULES[name] = importlib.import_module(f"benchmarks.bench_{name}")
    return MODULES[name]


def _command(argv: list[str]) -> str:
    cmd = " ".join(["python -m benchmarks.run_all", *argv])
    return f"make bench ({cmd})" if os.environ.get("MAKELEVEL") else cmd


def _scale(results: dict) -> dict:
    out = {"scenarios": cost_model.scenarios()}
    if all(name in results and "error" not in results[name] for name in ("step", "collectives", "update")):
        out["check"] = cost_model.check(results)
    return out


def run(names: list[str], quick: bool, argv: list[str]) -> dict:
    """Run ``names`` in order, merging into the stored results; returns them all."""
    results = {}
    if os.path.exists(RESULTS_JSON):
        with open(RESULTS_JSON) as f:
            results = json.load(f)
    meta = {"command": _command(argv), "quick": quick, **machine_facts()}
    for name in ORDER:
        if name not in names:
            continue
        print(f"== {TITLES[name]}", flush=True)
        t0, before = time.perf_counter(), git_state()
        try:
            result = _scale(results) if name == "scale" else _module(name).run(quick)
        except Exception:  # one broken benchmark (or distopt mid-edit) must not cost the others
            import traceback
            result = {"error": traceback.format_exc(limit=-6)}
            print(result["error"], file=sys.stderr, flush=True)
        result = json.loads(json.dumps(result))  # what is stored is exactly what is reported
        after = git_state()
        result["meta"] = {**meta, "wall_s": time.perf_counter() - t0, "git": before,
                          "code_changed_during_run": before != after}
        results[name] = result
        print(f"   {name}: {result['meta']['wall_s']:.0f}s", flush=True)
        with open(RESULTS_JSON, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _scale_markdown(result: dict) -> str:
    parts = [cost_model.MODEL]
    if "check" in result:
        parts += ["Check against the 2-worker runs of benchmark 1 (phase A, no Ray), predicted from the primitives "
                  "measured in benchmarks 2 and 3 (compute per sample from the stage-1 run; per-collective bus "
                  "bandwidth at the size nearest the 25 MB bucket; alpha from the smallest allreduce; memory "
                  "bandwidth from distopt's Adam):", md_table(cost_model.CHECK_HEADERS,
                                                              cost_model.check_rows(result["check"]))]
    parts += ["Predictions, stage 1, Adam, fp32 parameters and gradients on the wire; H100 at 40% of 989 TFLOP/s "
              "(6 x P FLOPs per token, 2048 tokens per sample, 8 samples per GPU), HBM at 80% of 3.35 TB/s, one "
              "flat ring with 80% of line rate and 5 us per hop, overlap on (the runtime's default). 256 MB buckets "
              "shown beside the default 25 MB: at 1024 GPUs the ring's per-bucket latency dominates. The full "
              "table (8 to 1024 GPUs) is in results.json:",
              md_table(cost_model.SCEN_HEADERS, cost_model.scenario_rows(result["scenarios"]))]
    return "\n\n".join(parts)


NOT_MEASURED = [
    "NCCL across GPUs: the GPU section ran on one H100, so NCCL ran as a group of one (its latency floor) and "
    "ranks sharing that GPU used gloo; every other number is gloo on CPU over loopback, and the cost model's "
    "many-GPU rows are predictions.",
    "More than one machine: no real network link; 'bus bandwidth' here is memory-to-memory through the "
    "kernel's loopback on 2 shared cores.",
    "The communication / compute split of the peers: DDP overlaps its allreduce with the backward pass, so "
    "only forward+backward(+overlapped allreduce) and `optimizer.step()` are separable without patching torch.",
    "ZeroRedundancyOptimizer's bytes on the wire: taken from the formula (about 1.5x DDP's), not counted.",
    "Ray's start-up: one Ray cluster serves every Trainer fit of phase B (the Trainer joins a running "
    "cluster); the per-fit actor start and the first 5 steps of each fit are excluded from step times.",
]


def _findings(results: dict) -> list[str]:
    """Where the step time goes, from the numbers measured here and the code as it stands."""
    from benchmarks.step_ranks import make_model
    out = []
    rows, b = results.get("update", {}).get("rows", {}), results.get("collectives", {}).get("busbw", {})
    summ = results.get("step", {}).get("summary", {})
    numel = sum(p.numel() for p in make_model().parameters())
    if "grad norm, _foreach_norm float64" in rows:
        t64, t32 = rows["grad norm, _foreach_norm float64"]["ms"], rows["grad norm, _foreach_norm float32"]["ms"]
        if norm_accumulation() == "float64":
            out.append(f"`global_norm` (distopt/optim/norm.py) takes the gradient norm with "
                       f"`torch._foreach_norm(..., dtype=torch.float64)`: {t64:.1f} ms per 10M parameters against "
                       f"{t32:.1f} ms in float32 (benchmark 3), about {t64 * numel / 2e7:.0f} ms of every stage-1/2 "
                       f"step of benchmark 1 ({t64 * numel / 1e7:.0f} ms at stage 0), inside `comm_s`.")
        else:
            out.append(f"The gradient norm now runs in float32 (`_foreach_norm` without `dtype`): {t32:.1f} ms per "
                       f"10M parameters, against {t64:.1f} ms with float64 accumulation (benchmark 3).")
    big = [s for s in b if int(s) >= 16 * 2**20]
    if big:
        s = min(big, key=int)
        out.append(f"Reduce-scatter at {int(s) // 2**20} MB (bus bandwidth): distopt {b[s]['distopt rs']:.3f} GB/s, "
                   f"torch's gloo `reduce_scatter_tensor` {b[s]['gloo rs']:.3f} GB/s (it clones the input, "
                   f"allreduces all of it and copies a chunk out), an `all_to_all` plus a local sum "
                   f"{b[s]['gloo a2a rs']:.3f} GB/s; allgather distopt {b[s]['distopt ag']:.3f} vs gloo "
                   f"{b[s]['gloo ag']:.3f} GB/s.")
    if summ:
        n = bucket_count()
        out.append(f"The runtime plans the benchmark MLP ({4 * numel:,} B of fp32 gradients) as {n} bucket(s)"
                   + (": its one reduction starts after the whole backward, where DDP starts with a 1 MB bucket "
                      "and overlaps the rest." if n == 1 else
                      "; the reductions of the last layers' buckets overlap the rest of the backward."))
    if "A:rt-s1-f3" in summ and "A:rt-s1-f0" in summ:
        on, off = summ["A:rt-s1-f3"], summ["A:rt-s1-f0"]
        out.append(f"Fault tolerance (max_failures > 0) adds {on['compute_ms'] - off['compute_ms']:.1f} ms to "
                   f"`compute_s` at stage 1, {on['time_ms'] - off['time_ms']:.1f} ms per step in all: the two "
                   f"ranks share a host, so it is one replay of the neighbour's committed update onto its replica "
                   f"in shared memory at the start of each step (distopt/ft/shared_replica.py).")
    if summ:
        out.append("The peers run torch's default Adam, which on CPU is the per-tensor loop (`optimizer_ms` above); "
                   "distopt's update is the fused kernel (benchmark 3).")
    return out


def _section(name: str, result: dict, figure: str | None) -> str:
    m = result["meta"]
    if "error" in result:
        body = f"**This benchmark failed**; its goals are missing from the summary.\n\n```\n{result['error']}```"
    else:
        body = _scale_markdown(result) if name == "scale" else _module(name).markdown(result)
    git = m.get("git", {})
    code = f"distopt at {git.get('commit', '?')}" + (f" with uncommitted changes in {', '.join(git['dirty'])}"
                                                     if git.get("dirty") else "")
    changed = (" **The code under distopt/ changed while this benchmark ran.**"
               if m.get("code_changed_during_run") else "")
    head = (f"## {TITLES[name]}\n\n_{m['command']}, {m['date']}, {m['wall_s']:.0f} s"
            f"{', quick' if m['quick'] else ''}; {code}._{changed}")
    fig = f"\n\n![{TITLES[name]}]({figure})" if figure else ""
    return f"{head}\n\n{body}{fig}"


def _figures(results: dict) -> dict[str, str]:
    draw = {"collectives": lambda r: plots.busbw(r, HERE), "step": lambda r: plots.step_bars(r, HERE),
            "memory": lambda r: plots.memory(r, HERE), "peak_memory": lambda r: plots.peak_memory(r, HERE),
            "scale": lambda r: plots.scaling(r["scenarios"], HERE),
            "precision": lambda r: _module("precision").plot(r, HERE)}
    return {name: draw[name](results[name]) for name in draw if name in results and "error" not in results[name]}


def write_markdown(results: dict, argv: list[str], wall_s: float) -> str:
    """Write RESULTS.md from every stored result; returns its path."""
    figures = _figures(results)
    facts = machine_facts()
    goals = [g for name in SECTIONS if name in results for g in results[name].get("goals", [])]
    held = sum(g["holds"] for g in goals)
    lines = [
        "# distopt benchmarks", "",
        f"Written by `{_command(argv)}` on {facts['date']} in {wall_s:.0f} s (this invocation). Machine: "
        f"{facts['cores']} cores ({facts['cpu']}), {facts['memory_gib']} GiB, {facts['os']}; Python "
        f"{facts['python']}, torch {facts['torch']}, Ray {facts['ray']}, NumPy {facts['numpy']}.", "",
        "The machine is small and shared, so absolute numbers drift from run to run: only ratios measured side "
        "by side in the same run are meaningful, and every benchmark interleaves its contenders (A B A B ...) "
        "and reports medians. Benchmarks record goals, they never assert them.", "",
        f"## Every goal ({held} of {len(goals)} hold)", "",
        goals_table(goals), ""]
    for name in SECTIONS:
        if name in results:
            lines += [_section(name, results[name], figures.get(name)), ""]
    lines += ["## Where the time goes (from the numbers above)", ""] + [f"- {x}" for x in _findings(results)]
    lines += ["", "## Not measured here", ""] + [f"- {x}" for x in NOT_MEASURED] + [""]
    with open(os.path.join(HERE, "NOTES.md"), encoding="utf-8") as f:  # hand-written; kept across runs
        lines += [f.read()]
    path = os.path.join(HERE, "RESULTS.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 2-minute smoke run: fewer sizes, rounds and steps")
    p.add_argument("--only", action="append", choices=ORDER,
                   help="run only this benchmark (repeatable)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results = run(args.only or DEFAULT, args.quick, argv)
    path = write_markdown(results, argv, time.perf_counter() - t0)
    for name in ORDER:
        for g in results.get(name, {}).get("goals", []):
            print("  " + " | ".join(goal_row(g)))
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    failed = [name for name in (args.only or DEFAULT) if "error" in results.get(name, {})]
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)} (see RESULTS.md)")


if __name__ == "__main__":
    main()
