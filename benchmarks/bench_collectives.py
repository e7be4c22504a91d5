"""Benchmark 2, the allreduce layer: distopt's TorchCommunicator against raw gloo calls.

Two spawned processes, each holding a distopt ``TorchCommunicator`` and, beside it, an
``init_process_group("gloo")`` of its own; both bind to loopback. On the same fp32 buffers
(4 KB to 256 MB) the contenders alternate call by call:

* ``comm.allreduce`` vs ``dist.all_reduce``;
* ``comm.reduce_scatter`` + ``comm.allgather`` vs ``dist.reduce_scatter_tensor`` +
  ``dist.all_gather_into_tensor`` (each half also timed alone).

Bus bandwidth as nccl-tests defines it: allreduce ``S/t * 2(n-1)/n``, reduce_scatter and
allgather ``S/t * (n-1)/n`` (S the full buffer). Then 1,000 tensors of 10K floats:
``distopt.collectives.allreduce_tensors`` (bucketed) vs one ``dist.all_reduce`` each.
Reductions are sums on both sides (raw gloo has no mean). For reference, a reduce_scatter
built from ``dist.all_to_all_single`` plus a local sum (``gloo a2a rs``): torch's gloo
``reduce_scatter_tensor`` is a clone, a full allreduce and a chunk copy, so it moves twice
the bytes a reduce_scatter needs. Run alone:
``python -m benchmarks.bench_collectives [--quick]``.
"""
from __future__ import annotations

import os
import time

import torch

from benchmarks.common import (goal, goals_table, md_table, median, print_goals, ProcessPair, rotated, run_alone, serve,
                               text_table)

SIZES = [4 * 2**10 * 4**i for i in range(9)]  # 4 KB .. 256 MB
QUICK_SIZES = [4 * 2**10, 256 * 2**10, 4 * 2**20, 64 * 2**20]
OPS = ["distopt allreduce", "gloo all_reduce", "distopt rs+ag", "gloo rs+ag", "gloo a2a rs"]
MANY, MANY_NUMEL = 1000, 10_000


def _reps(size: int, quick: bool) -> int:
    budget = 2**28 if quick else 2**31  # bytes per contender and size
    return max(3 if quick else 9, min(50 if quick else 200, budget // size))


def _timers(comm, t: torch.Tensor, shard: torch.Tensor, rs_ag_parts: dict) -> dict:
    import torch.distributed as dist

    def distopt_rs_ag() -> None:
        t0 = time.perf_counter()
        comm.reduce_scatter(t, "sum", out=shard)
        t1 = time.perf_counter()
        comm.allgather(shard, out=t)
        rs_ag_parts.setdefault("distopt", []).append((t1 - t0, time.perf_counter() - t1))

    def gloo_rs_ag() -> None:
        t0 = time.perf_counter()
        dist.reduce_scatter_tensor(shard, t)
        t1 = time.perf_counter()
        dist.all_gather_into_tensor(t, shard)
        rs_ag_parts.setdefault("gloo", []).append((t1 - t0, time.perf_counter() - t1))

    received = torch.empty_like(t)

    def gloo_a2a_rs() -> None:
        dist.all_to_all_single(received, t)  # chunk r of every rank lands here, rank by rank
        torch.sum(received.view(comm.world_size, -1), 0, out=shard)

    return {"distopt allreduce": lambda: comm.allreduce(t, "sum"), "gloo all_reduce": lambda: dist.all_reduce(t),
            "distopt rs+ag": distopt_rs_ag, "gloo rs+ag": gloo_rs_ag, "gloo a2a rs": gloo_a2a_rs}


def _sweep(comm, sizes: list[int], quick: bool) -> dict:
    import torch.distributed as dist
    out = {}
    for size in sizes:
        t = torch.zeros(size // 4)  # zeros: sums stay finite however many reps
        shard = torch.zeros(size // 4 // comm.world_size)
        parts: dict = {}
        fns = _timers(comm, t, shard, parts)
        times: dict[str, list[float]] = {op: [] for op in OPS}
        for op in OPS:  # one untimed call each: connections and buffers warmed up
            fns[op]()
        parts.clear()
        for rep in range(_reps(size, quick)):
            for op in rotated(OPS, rep):
                dist.barrier()
                t0 = time.perf_counter()
                fns[op]()
                times[op].append(time.perf_counter() - t0)
        out[size] = dict(times)  # every call's time: the driver pairs them rep by rep
        for who, pairs in parts.items():
            out[size][f"{who} rs"] = [p[0] for p in pairs]
            out[size][f"{who} ag"] = [p[1] for p in pairs]
    return out


def _many(comm, quick: bool) -> dict:
    import torch.distributed as dist

    from distopt.collectives import allreduce_tensors
    tensors = [torch.zeros(MANY_NUMEL) for _ in range(MANY)]
    fns = {"distopt allreduce_tensors": lambda: allreduce_tensors(comm, tensors, op="sum"),
           "gloo all_reduce per tensor": lambda: [dist.all_reduce(x) for x in tensors]}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(3 if quick else 7):
        for name in rotated(list(fns), rep):
            dist.barrier()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in times.items()}


def rank_main(rank: int, world: int, cmds, results, port_distopt: int, port_raw: int) -> None:
    """A rank process: a distopt group and a raw gloo group, both on loopback; serves ``(sizes, quick)``."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the raw group on loopback too, as distopt's is
    import torch.distributed as dist

    from distopt.collectives import TorchCommunicator
    torch.set_num_threads(1)
    comm = TorchCommunicator(rank, world, "127.0.0.1", port_distopt, "gloo", timeout_s=300)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port_raw}", rank=rank, world_size=world)
    try:
        serve(rank, cmds, results, lambda cmd: {"sizes": _sweep(comm, cmd[0], cmd[1]), "many": _many(comm, cmd[1])})
    finally:
        comm.close()
        dist.destroy_process_group()


def busbw(op: str, size: int, seconds: float, n: int = 2) -> float:
    """nccl-tests bus bandwidth in GB/s."""
    factor = (n - 1) / n if op.endswith((" rs", " ag")) else 2 * (n - 1) / n  # "a2a rs" ends in " rs"
    return size / seconds * factor / 1e9


def run(quick: bool = False) -> dict:
    """The sweep on 2 processes; returns per-size median times, bus bandwidths, paired ratios and goals."""
    from distopt.collectives import free_port
    sizes = QUICK_SIZES if quick else SIZES
    pair = ProcessPair(rank_main, (free_port(), free_port()))
    try:
        per_rank = pair.call((sizes, quick))
    finally:
        pair.close()
    # Per call, the slower rank (the collective is done when both are); then medians for the
    # bandwidths, and for the goals the median of per-repetition ratios, distopt's call against
    # the gloo call made next to it (drift on a shared machine cancels out of each pair).
    # Keys are str(size) so the result survives a JSON round trip unchanged.
    calls = {str(s): {op: [max(ts) for ts in zip(*(r["sizes"][s][op] for r in per_rank))]
                      for op in per_rank[0]["sizes"][s]} for s in sizes}
    times = {s: {op: median(ts) for op, ts in ops.items()} for s, ops in calls.items()}
    paired = {s: {kind: median(g / d for d, g in zip(ops[f"distopt {kind}"], ops[f"gloo {gloo}"]))
                  for kind, gloo in (("allreduce", "all_reduce"), ("rs+ag", "rs+ag"))} for s, ops in calls.items()}
    many = {k: max(r["many"][k] for r in per_rank) for k in per_rank[0]["many"]}
    bw = {str(s): {op: busbw(op, s, t) for op, t in times[str(s)].items()} for s in sizes}
    goals = []
    for s in sizes:
        if s >= 4 * 2**20:
            for kind in ("allreduce", "rs+ag"):
                goals.append(goal(f"{kind} busbw distopt / gloo, {_size(s)} (paired median)",
                                  paired[str(s)][kind], 0.95, at_most=False))
    speedup = many["gloo all_reduce per tensor"] / many["distopt allreduce_tensors"]
    goals.append(goal(f"{MANY} x {MANY_NUMEL} floats: per-tensor gloo time / bucketed distopt time", speedup, 5.0,
                      at_most=False))
    return {"sizes": sizes, "times": times, "busbw": bw, "paired": paired, "many": many, "goals": goals}


def _size(s: int) -> str:
    return f"{s // 2**20} MB" if s >= 2**20 else f"{s // 2**10} KB"


HEADERS = ["size", "distopt allreduce", "gloo all_reduce", "paired ratio", "distopt rs+ag", "gloo rs+ag",
           "paired ratio",
           "distopt rs / ag", "gloo rs / ag", "gloo a2a rs"]


def table_rows(result: dict) -> list[list[str]]:
    """Bus bandwidth (GB/s) per size; ratios distopt / gloo."""
    rows = []
    for s in result["sizes"]:
        b = result["busbw"][str(s)]
        pr = result["paired"][str(s)]
        rows.append([_size(s), f"{b['distopt allreduce']:.3f}", f"{b['gloo all_reduce']:.3f}",
                     f"{pr['allreduce']:.3f}", f"{b['distopt rs+ag']:.3f}", f"{b['gloo rs+ag']:.3f}",
                     f"{pr['rs+ag']:.3f}",
                     f"{b.get('distopt rs', 0):.3f} / {b.get('distopt ag', 0):.3f}",
                     f"{b.get('gloo rs', 0):.3f} / {b.get('gloo ag', 0):.3f}", f"{b['gloo a2a rs']:.3f}"])
    return rows


def markdown(result: dict) -> str:
    """The RESULTS.md section."""
    many = result["many"]
    return "\n\n".join([
        "Bus bandwidth in GB/s (nccl-tests definition), median of interleaved calls, slower rank; "
        "2 processes on loopback, one torch thread each, sums. The ratio columns are the median over "
        "repetitions of gloo's time / distopt's time for the two calls made side by side (> 1: distopt faster).",
        md_table(HEADERS, table_rows(result)),
        f"{MANY} tensors of {MANY_NUMEL} floats: `allreduce_tensors` (25 MB buckets) "
        f"{1e3 * many['distopt allreduce_tensors']:.1f} ms, one `dist.all_reduce` per tensor "
        f"{1e3 * many['gloo all_reduce per tensor']:.1f} ms.",
        goals_table(result["goals"]),
    ])


def main() -> None:
    result = run_alone(__doc__, "four sizes, fewer repetitions", run)
    print(text_table(HEADERS, table_rows(result)))
    print({k: f"{1e3 * v:.1f} ms" for k, v in result["many"].items()})
    print_goals(result["goals"])


if __name__ == "__main__":
    main()
