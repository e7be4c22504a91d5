"""Benchmark 6, scale: an alpha-beta ring cost model of a distopt step, and its predictions.

See :data:`MODEL` for the model in words. ``python -m benchmarks.cost_model`` prints the
H100 predictions and, when ``benchmarks/results.json`` exists (``run_all`` writes it), the
check against the measured 2-worker runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, replace

BUCKET_BYTES = 25 * 2**20
ADAM_STATE_B, ADAM_UPDATE_B, FT_EXTRA_B = 8, 28, 52  # per shard parameter
PACK_B, NORM_B = 8, 4  # gradient copy into the buckets (per parameter), norm pass (per shard parameter)

MODEL = (
    "A step is compute (forward and backward: per-sample time x batch), then the gradient reduction, the "
    "gradient norm, the shard update and the parameter gather. Per bucket (25 MB by default) a ring over "
    "n ranks costs 2(n-1) alpha + 2(n-1)/n x bytes / busbw for an allreduce (stage 0) and (n-1) alpha + "
    "(n-1)/n x bytes / busbw for a reduce_scatter or an allgather (stages 1 and 2), plus one 8-byte "
    "allreduce of the norm. With overlap (the runtime's default) bucket reductions run during the "
    "backward (taken as 2/3 of the compute), so only what exceeds it, and at least the last-launched "
    "bucket's reduction, is exposed; the parameter gather is never hidden. Local memory traffic: "
    "gradients copied into the buckets (8 B per parameter), the norm pass (4 B per shard parameter, at "
    "the bandwidth the code's norm kernel reaches), Adam (28 B per shard parameter). Fault tolerance adds "
    "a ring shift of the shard's gradients (on the link beside the gather) and about 52 B per shard "
    "parameter of memory traffic (snapshot copy 24, the neighbour's replayed update 28). Memory per GPU: "
    "parameters, gradients (stage 2: a staging bucket), gradient shard, Adam state and the redundancy; "
    "activations are not modelled.")


@dataclass(frozen=True)
class Link:
    """The interconnect as the ring sees it: per-hop latency and bus bandwidth (bytes/s).

    ``busbw_rs``/``busbw_ag`` default to ``busbw``; measured gloo numbers differ per collective.
    """

    alpha_s: float
    busbw: float
    busbw_rs: float | None = None
    busbw_ag: float | None = None

    @classmethod
    def line_rate(cls, gbit_s: float, efficiency: float = 0.8, alpha_s: float = 5e-6) -> "Link":
        """A network link of ``gbit_s`` Gb/s per GPU reaching ``efficiency`` of line rate."""
        return cls(alpha_s, gbit_s * 1e9 / 8 * efficiency)


@dataclass(frozen=True)
class Workload:
    """A model and its per-GPU work: fp32 parameters, Adam."""

    params: float
    compute_s_per_sample: float  # forward + backward, one sample, one GPU
    batch_per_gpu: int
    mem_bw: float  # bytes/s the update kernel streams at
    param_bytes: int = 4
    bucket_bytes: float = BUCKET_BYTES  # distopt's default; each bucket pays the ring latency
    norm_bw: float | None = None  # bytes/s of the gradient-norm pass (default: mem_bw)
    buckets: int | None = None  # the plan's bucket count (default: total bytes / bucket_bytes, rounded up)


@dataclass(frozen=True)
class Prediction:
    """One step at world size ``n``: seconds per phase and bytes per GPU."""

    n: int
    compute_s: float
    comm_s: float
    update_s: float
    memory_bytes: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s + self.update_s

    @property
    def efficiency(self) -> float:
        """Fraction of the step spent computing (1.0 = perfect scaling)."""
        return self.compute_s / self.step_s


def ring(kind: str, nbytes: float, n: int, link: Link) -> float:
    """Seconds for one ring collective of ``nbytes`` (the full buffer) over ``n`` ranks."""
    if n == 1:
        return 0.0
    if kind == "allreduce":
        return 2 * (n - 1) * link.alpha_s + 2 * (n - 1) / n * nbytes / link.busbw
    bw = {"reduce_scatter": link.busbw_rs, "allgather": link.busbw_ag}[kind] or link.busbw
    return (n - 1) * link.alpha_s + (n - 1) / n * nbytes / bw


def predict(w: Workload, link: Link, n: int, zero_stage: int = 1, fault_tolerant: bool = False,
            overlap: bool = True) -> Prediction:
    """Step time and memory per GPU for ``w`` on ``n`` GPUs joined by ``link`` (see :data:`MODEL`)."""
    total = w.params * w.param_bytes
    buckets = w.buckets or max(1, math.ceil(total / w.bucket_bytes))
    per_bucket = total / buckets
    compute = w.compute_s_per_sample * w.batch_per_gpu
    shard = w.params / (n if zero_stage >= 1 else 1)
    reduce = buckets * ring("allreduce" if zero_stage == 0 else "reduce_scatter", per_bucket, n, link)
    if overlap and buckets > 1:  # under the backward (~2/3 of compute), all but the last-launched bucket
        reduce = max(reduce / buckets, reduce - compute * 2 / 3)
    gather = buckets * ring("allgather", per_bucket, n, link) if zero_stage >= 1 else 0.0
    local = w.params * PACK_B / w.mem_bw + shard * NORM_B / (w.norm_bw or w.mem_bw)
    comm = local + reduce + gather + (ring("allreduce", 8, n, link) if zero_stage >= 1 else 0.0)
    update = shard * ADAM_UPDATE_B / w.mem_bw
    if fault_tolerant and n > 1:
        update += shard * FT_EXTRA_B / w.mem_bw
        if zero_stage >= 1:  # the shift shares the link with the gather, overlapped or not
            comm += link.alpha_s + shard * w.param_bytes / link.busbw
    return Prediction(n, compute, comm, update, memory(w.params, n, zero_stage, fault_tolerant, w.param_bytes))


def memory(params: float, n: int, zero_stage: int, fault_tolerant: bool = False, param_bytes: int = 4) -> float:
    """Bytes per GPU: parameters, gradients, Adam state, gradient shard, redundancy."""
    p = param_bytes
    shard = params / (n if zero_stage >= 1 else 1)
    grads = params * p if zero_stage <= 1 else 2 * min(BUCKET_BYTES, params * p)  # stage 2: staging bucket
    grad_shard = shard * p if zero_stage >= 1 else 0.0
    total = params * p + grads + grad_shard + shard * ADAM_STATE_B
    if fault_tolerant:
        # Snapshot (params + state) always; replica (params + state) and two gradient buffers when sharded.
        total += shard * (p + ADAM_STATE_B) * (2 if zero_stage >= 1 and n > 1 else 1)
        total += 2 * shard * p if zero_stage >= 1 and n > 1 else 0.0
    return total


# --- H100 scenarios ---------------------------------------------------------------------
H100_FLOPS = 989e12 * 0.4  # dense bf16 peak at 40% MFU
H100_HBM = 3.35e12 * 0.8
TOKENS_PER_SAMPLE = 2048
MODELS = {"1B": 1e9, "7B": 7e9}
LINKS = {"100 Gb/s": 100, "400 Gb/s": 400}
WORLDS = [8, 16, 32, 64, 128, 256, 512, 1024]


def h100_workload(params: float, batch_per_gpu: int = 8) -> Workload:
    """A transformer of ``params`` on H100s: 6 x params FLOPs per token, 2048 tokens a sample."""
    return Workload(params, 6 * params * TOKENS_PER_SAMPLE / H100_FLOPS, batch_per_gpu, H100_HBM)


def scenarios(stage: int = 1) -> list[dict]:
    """Predictions for every model x link x world size at ``stage`` (25 MB buckets), and the
    same with 256 MB buckets, where the ring's per-bucket latency term shrinks tenfold."""
    out = []
    for bucket_mb in (25, 256):
        for mname, params in MODELS.items():
            for lname, gbit in LINKS.items():
                w = replace(h100_workload(params), bucket_bytes=bucket_mb * 2**20)
                for n in WORLDS:
                    p = predict(w, Link.line_rate(gbit), n, stage)
                    out.append({"model": mname, "link": lname, "bucket_mb": bucket_mb, "n": n, "stage": stage,
                                "step_s": p.step_s, "compute_s": p.compute_s, "comm_s": p.comm_s,
                                "update_s": p.update_s, "efficiency": p.efficiency,
                                "memory_gb": p.memory_bytes / 1e9, "memory_stage2_gb": memory(params, n, 2) / 1e9,
                                "memory_stage0_gb": memory(params, n, 0) / 1e9,
                                "samples_s": n * w.batch_per_gpu / p.step_s})
    return out


def check(results: dict) -> list[dict]:
    """Predict the measured 2-worker runs of benchmark 1 from the primitives measured in 2 and 3.

    Inputs: compute per sample from the runtime's stage-1 ``compute_s``; per-collective bus
    bandwidth from benchmark 2 at the bucket size (nearest measured size); alpha from the
    smallest allreduce; memory bandwidth from distopt's Adam and the norm kernel the code
    uses in benchmark 3.
    """
    from benchmarks.common import bucket_count, norm_accumulation
    from benchmarks.step_ranks import BATCH_PER_WORKER, make_model
    step, coll, upd = results["step"]["summary"], results["collectives"], results["update"]
    params = sum(p.numel() for p in make_model().parameters())
    sizes = [int(s) for s in coll["busbw"]]
    near = min(sizes, key=lambda s: abs(math.log(s / (params * 4))))
    bw, smallest = coll["busbw"][str(near)], coll["times"][str(min(sizes))]
    link = Link(smallest["distopt allreduce"] / 2, bw["distopt allreduce"] * 1e9,
                bw["distopt rs"] * 1e9, bw["distopt ag"] * 1e9)
    mem_bw = upd["rows"]["distopt adam rule.update"]["gb_s"] * 1e9
    norm_kind = norm_accumulation()
    norm_bw = upd["rows"][f"grad norm, _foreach_norm {norm_kind}"]["gb_s"] * 1e9
    compute = step["A:rt-s1-f0"]["compute_ms"] / 1e3 / BATCH_PER_WORKER
    w = Workload(params, compute, BATCH_PER_WORKER, mem_bw, norm_bw=norm_bw, buckets=bucket_count())
    out = []
    for key, stage, ft in [("rt-s0-f0", 0, False), ("rt-s1-f0", 1, False), ("rt-s2-f0", 2, False),
                           ("rt-s1-f3", 1, True), ("rt-s2-f3", 2, True)]:
        if f"A:{key}" not in step:
            continue
        p, m = predict(w, link, 2, stage, ft), step[f"A:{key}"]
        out.append({"contender": key, "pred_ms": 1e3 * p.step_s, "meas_ms": m["time_ms"],
                    "pred_comm_ms": 1e3 * p.comm_s, "meas_comm_ms": m.get("comm_ms", float("nan")),
                    "pred_update_ms": 1e3 * p.update_s, "meas_update_ms": m.get("update_ms", float("nan"))})
    return out


CHECK_HEADERS = ["contender (runtime, 2 workers)", "predicted ms", "measured ms", "pred / meas",
                 "comm pred / meas ms", "update pred / meas ms"]
SCEN_HEADERS = ["model", "link", "bucket MB", "GPUs", "step s", "compute / comm / update s", "efficiency", "samples/s",
                "memory/GPU GB (stage 1)", "memory/GPU GB (stage 2)"]


def check_rows(rows: list[dict]) -> list[list[str]]:
    """Predicted against measured, one row per contender."""
    return [[r["contender"], f"{r['pred_ms']:.1f}", f"{r['meas_ms']:.1f}", f"{r['pred_ms'] / r['meas_ms']:.2f}",
             f"{r['pred_comm_ms']:.1f} / {r['meas_comm_ms']:.1f}",
             f"{r['pred_update_ms']:.1f} / {r['meas_update_ms']:.1f}"] for r in rows]


def scenario_rows(rows: list[dict], worlds: tuple = (8, 64, 1024)) -> list[list[str]]:
    """The H100 predictions at a few world sizes."""
    return [[r["model"], r["link"], r["bucket_mb"], r["n"], f"{r['step_s']:.2f}",
             f"{r['compute_s']:.2f} / {r['comm_s']:.2f} / {r['update_s']:.3f}", f"{r['efficiency']:.2f}",
             f"{r['samples_s']:,.0f}", f"{r['memory_gb']:.1f}", f"{r['memory_stage2_gb']:.1f}"]
            for r in rows if r["n"] in worlds]


def main() -> None:
    from benchmarks.common import HERE, text_table
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(text_table(SCEN_HEADERS, scenario_rows(scenarios())))
    path = os.path.join(HERE, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
        if {"step", "collectives", "update"} <= set(results):
            print(text_table(CHECK_HEADERS, check_rows(check(results))))


if __name__ == "__main__":
    main()
