"""Benchmark 1, step time: distopt against torch DDP and ZeroRedundancyOptimizer.

2 workers, gloo over loopback, one thread each; the MLP 512-2048-2048-512 (6.3M
parameters), 32 samples per worker, Adam, MSE on synthetic data. Two phases, each
interleaving its contenders round by round (A B C A B C ...):

* phase A, no Ray anywhere: DDP, ZeRO and the distopt runtime's ``Worker`` in two spawned
  processes (``connect`` + ``run_step``), zero stage 0/1/2, fault tolerance off and on;
* phase B, a Ray cluster up: DDP and ZeRO again, and ``distopt.Trainer`` (``ray_address=None``
  joins the cluster started here, as the Trainer's own start would make it) at stage
  0/1/2 with ``max_failures=0`` and with the default ``max_failures=3``.

Ratios are only taken within a phase. Run alone: ``python -m benchmarks.bench_step [--quick]``.
"""
from __future__ import annotations

import time

from benchmarks import step_ranks
from benchmarks.common import (goal, goals_table, md_table, median, print_goals, ProcessPair, rotated, run_alone,
                               text_table)

RUNTIME = ["rt-s0-f0", "rt-s1-f0", "rt-s1-f0-nooverlap", "rt-s2-f0", "rt-s1-f3", "rt-s2-f3"]
TRAINER = ["tr-s0-f0", "tr-s1-f0", "tr-s2-f0", "tr-s1-f3", "tr-s2-f3"]
PEERS = ["ddp", "zero"]
LABELS = {"ddp": "DDP + torch.optim.Adam", "zero": "DDP + ZeroRedundancyOptimizer(Adam)"}
SPLIT = ("data_s", "compute_s", "comm_s", "update_s", "backward_s", "optimizer_s")


def label(name: str) -> str:
    """Human name of a contender key such as ``rt-s1-f0`` or ``tr-s2-f3``."""
    if name in LABELS:
        return LABELS[name]
    kind, stage, failures, *rest = name.split("-")
    where = "runtime, no Ray" if kind == "rt" else "Trainer on Ray"
    extra = ", buckets reduced after backward (overlap off)" if "nooverlap" in rest else ""
    return f"distopt {where}, stage {stage[1:]}, max_failures={failures[1:]}{extra}"


def _trainer_trial(name: str, steps: int, warmup: int) -> list[dict]:
    import distopt
    stage, failures = (int(p[1:]) for p in name.split("-")[1:])
    trainer = distopt.Trainer(
        model=step_ranks.make_model, loss=step_ranks.mse_loss, data=step_ranks.make_data(),
        optimizer=distopt.optim.adam(lr=step_ranks.LR), global_batch_size=2 * step_ranks.BATCH_PER_WORKER,
        zero_stage=stage, seed=step_ranks.SEED, scaling=distopt.ScalingConfig(num_workers=2),
        failure=distopt.FailureConfig(max_failures=failures), run=distopt.RunConfig(log_every=0, progress=False))
    return trainer.fit(steps=warmup + steps).history[warmup:]


def _start_ray() -> None:
    from distopt.runtime.trainer import start_embedded_ray
    # What Trainer(scaling=ScalingConfig(ray_address=None)) would start, once for every fit instead of once per fit.
    start_embedded_ray(num_cpus=2, log_to_driver=False)
    time.sleep(3.0)  # let the prestarted idle workers finish importing


def _pair_trial(pair: ProcessPair, name: str, first: int, steps: int) -> list[dict]:
    per_rank = pair.call((name, first, steps))
    # Per step: the slowest rank's time (the step is done when both are) and the mean of the
    # ranks' phases (a rank's comm_s includes waiting for the other's compute, so per-phase
    # maxima would count that wait twice; means add up to the mean rank time).
    return [{k: max(r[k] for r in ranks) if k == "time_s" else sum(r[k] for r in ranks) / len(ranks)
             for k in ranks[0]} for ranks in zip(*per_rank)][1:]


def _schedule(names: list[str], rounds: int, peers_around: bool) -> list[str]:
    """The order of trials: rounds of every contender, rotated round by round. With
    ``peers_around`` (phase B) both peers run right before every other contender and once
    more at the end, so each slow Trainer fit has peer trials on both sides of it."""
    if not peers_around:
        return [name for r in range(rounds) for name in rotated(names, r)]
    others = [n for n in names if n not in PEERS]
    order = [x for r in range(rounds) for i, name in enumerate(rotated(others, r))
             for x in rotated(PEERS, r + i) + [name]]
    return order + PEERS


def _phase(schedule: list[str], steps: int, peer_steps: int, pair: ProcessPair, warmup: int, phase: str,
           samples: dict[str, list[dict]], trials: list[dict], errors: dict[str, str]) -> None:
    first = 1000
    for seq, name in enumerate(schedule):
        t0 = time.perf_counter()
        if name in errors:
            continue
        if name.startswith("tr-"):
            try:
                rows = _trainer_trial(name, steps, warmup)
            except Exception as e:  # a failed fit drops this contender, not the benchmark
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                errors[name] = f"{type(e).__name__}: {first_line}"
                print(f"  phase {phase} {name} failed: {errors[name]}", flush=True)
                continue
        else:
            n = peer_steps if name in PEERS else steps
            rows = _pair_trial(pair, name, first, n + 1)
            first += n + 1
        samples.setdefault(f"{phase}:{name}", []).extend(rows)
        trials.append({"phase": phase, "name": name, "seq": seq, "ms": 1e3 * median(x["time_s"] for x in rows)})
        print(f"  phase {phase} trial {seq + 1}/{len(schedule)} {name:9s} {trials[-1]['ms']:7.1f} ms"
              f"  ({time.perf_counter() - t0:.1f}s)", flush=True)


def paired_ratio(trials: list[dict], phase: str, name: str, ref: str) -> float:
    """Median over ``name``'s trials of its median step over ``ref``'s, ``ref`` taken from its
    nearest trials before and after (mean of the two): drift on a shared machine cancels out."""
    mine = [t for t in trials if t["phase"] == phase and t["name"] == name]
    refs = [t for t in trials if t["phase"] == phase and t["name"] == ref]
    ratios = []
    for t in mine:
        before = [r["ms"] for r in refs if r["seq"] < t["seq"]][-1:]
        after = [r["ms"] for r in refs if r["seq"] > t["seq"]][:1]
        if before or after:
            ratios.append(t["ms"] / (sum(before + after) / len(before + after)))
    return median(ratios)


def summarize(samples: dict[str, list[dict]]) -> dict[str, dict]:
    """Median step time and phase split (ms) per ``phase:contender`` key."""
    out = {}
    for key, rows in samples.items():
        s = {"steps": len(rows), "time_ms": 1e3 * median(x["time_s"] for x in rows)}
        for k in SPLIT:
            if k in rows[0]:
                s[k.replace("_s", "_ms")] = 1e3 * median(x[k] for x in rows)
        out[key] = s
    return out


def goals_of(result: dict) -> list[dict]:
    """The step-time goals: stage 1/2 <= 0.9x ZeRO and <= 1.0x DDP (paired ratios)."""
    out = []
    for phase, kind in (("A", "rt"), ("B", "tr")):
        for stage in (1, 2):
            name = f"{kind}-s{stage}-f0"
            if f"{phase}:{name}" in result["summary"]:
                out.append(goal(f"{label(name)} / ZeRO", paired_ratio(result["trials"], phase, name, "zero"), 0.9))
                out.append(goal(f"{label(name)} / DDP", paired_ratio(result["trials"], phase, name, "ddp"), 1.0))
    off = result["summary"].get("A:rt-s1-f0-nooverlap")
    if off and "A:rt-s1-f0" in result["summary"]:
        # Overlap: the step must take less than computing and then communicating would.
        on = result["summary"]["A:rt-s1-f0"]
        out.append(goal("stage 1 step, overlapped / (compute + comm) without overlap (runtime)",
                        on["time_ms"] / (off["compute_ms"] + off["comm_ms"]), 1.0))
    return out


def overheads(result: dict) -> list[list[str]]:
    """Fault-tolerance overhead (paired) and the Trainer against the bare runtime (no goal)."""
    rows, summary, trials = [], result["summary"], result["trials"]
    for stage in (1, 2):
        for phase, kind in (("A", "rt"), ("B", "tr")):
            on, off = summary.get(f"{phase}:{kind}-s{stage}-f3"), summary.get(f"{phase}:{kind}-s{stage}-f0")
            if on and off:
                rows.append([f"max_failures=3 / max_failures=0, {'runtime' if kind == 'rt' else 'Trainer'}, "
                             f"stage {stage}",
                             f"{paired_ratio(trials, phase, f'{kind}-s{stage}-f3', f'{kind}-s{stage}-f0'):.3f}",
                             f"{on['time_ms'] - off['time_ms']:+.1f} ms (medians)"])
    for stage in (0, 1, 2):
        name = f"s{stage}-f0"
        if f"B:tr-{name}" in summary and f"A:rt-{name}" in summary:
            ratio = paired_ratio(trials, "B", f"tr-{name}", "ddp") / paired_ratio(trials, "A", f"rt-{name}", "ddp")
            rows.append([f"Trainer / runtime, stage {stage}, each against DDP in its phase", f"{ratio:.3f}",
                         "Ray's cost per step, indirectly"])
    return rows


def table_rows(result: dict) -> list[list[str]]:
    """One row per contender: phase, median step, split, paired ratio to DDP and ZeRO of its phase."""
    def ms(s: dict, k: str) -> str:
        return f"{s[k]:.1f}" if k in s else ""
    rows = []
    for key, s in result["summary"].items():
        phase, name = key.split(":")
        ratios = ["1.000" if name == peer else f"{paired_ratio(result['trials'], phase, name, peer):.3f}"
                  for peer in PEERS]
        rows.append([phase, label(name), s["steps"], f"{s['time_ms']:.1f}", ms(s, "compute_ms") or ms(s, "backward_ms"),
                     ms(s, "comm_ms"), ms(s, "update_ms") or ms(s, "optimizer_ms"), ms(s, "data_ms"), *ratios])
    return rows


HEADERS = ["phase", "contender", "steps", "step ms", "compute ms", "comm ms", "update ms", "data ms", "x DDP", "x ZeRO"]


def run(quick: bool = False) -> dict:
    """Both phases; returns ``{"summary", "trials", "goals", "overheads", "config", "errors"}``."""
    from distopt.collectives import free_port
    rounds_a, rounds_b, steps, peer_steps_b = (2, 1, 8, 8) if quick else (8, 4, 25, 15)
    trainer_names = ["tr-s1-f0", "tr-s1-f3"] if quick else TRAINER
    names = PEERS + RUNTIME
    pair = ProcessPair(step_ranks.rank_main, (free_port(), {n: free_port() for n in names}, names, 5))
    samples: dict[str, list[dict]] = {}
    trials: list[dict] = []
    errors: dict[str, str] = {}
    try:
        pair.call("ping")
        _phase(_schedule(names, rounds_a, False), steps, steps, pair, 5, "A", samples, trials, errors)
        _start_ray()
        try:
            _phase(_schedule(PEERS + trainer_names, rounds_b, True), steps, peer_steps_b, pair, 5, "B", samples,
                   trials, errors)
        finally:
            import ray
            ray.shutdown()
    finally:
        pair.close()
    config = {"rounds_A": rounds_a, "rounds_B": rounds_b, "steps_per_trial": steps, "peer_steps_B": peer_steps_b,
              "warmup_excluded": 5, "params": sum(p.numel() for p in step_ranks.make_model().parameters())}
    result = {"summary": summarize(samples), "trials": trials, "config": config, "errors": errors}
    return {**result, "goals": goals_of(result), "overheads": overheads(result)}


def markdown(result: dict) -> str:
    """The RESULTS.md section."""
    c = result["config"]
    return "\n\n".join([
        f"{c['rounds_A']} (phase A) / {c['rounds_B']} (phase B) interleaved rounds of {c['steps_per_trial']} timed "
        f"steps per contender and trial ({c['params']:,} parameters); in phase B both peers run "
        f"{c.get('peer_steps_B', c['steps_per_trial'])} steps right before every Trainer fit. `step ms` is the "
        f"median over all steps; `x DDP` and `x ZeRO` are paired: the median over a contender's trials of its "
        f"median over the mean of the peer's nearest trials before and after it. Phase A has no Ray process "
        f"running; phase B has a Ray cluster up (the Trainer joins it). For the peers the split "
        f"columns are forward+backward (the allreduce overlaps it) and `optimizer.step()` (ZeRO: update + "
        f"broadcast); for distopt, the Worker's `compute_s`, `comm_s`, `update_s`, `data_s`: in phase A the mean "
        f"over the two ranks, in phase B the Trainer history's per-phase maximum over ranks (whose sum can "
        f"exceed the step: one rank's `comm_s` includes waiting for the other's compute). Peers use torch's "
        f"defaults (`torch.optim.Adam()` on CPU: the per-tensor loop); distopt uses its defaults (Trainer and "
        f"TrainConfig defaults, bucket 25 MB).",
        md_table(HEADERS, table_rows(result)),
        goals_table(result["goals"]),
        md_table(["overhead", "ratio", "note"], result["overheads"]),
    ] + [f"**{label(name)} failed** and was dropped: `{err}`" for name, err in result.get("errors", {}).items()])


def main() -> None:
    result = run_alone(__doc__, "fewer rounds and steps (a smoke run)", run)
    print(text_table(HEADERS, table_rows(result)))
    print_goals(result["goals"])
    print(text_table(["overhead", "ratio", "note"], result["overheads"]))


if __name__ == "__main__":
    main()
