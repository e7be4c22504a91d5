"""Muon sharded by whole matrices: each rank's update time against the unsharded update, and
the bytes a step sends against DDP's.

Two rank processes (gloo on 127.0.0.1) hold the hidden matrices of a GPT block stack
(``LAYERS`` blocks of d x 3d, d x d, d x 4d and 4d x d) and run, interleaved step by step:

* distopt ``ShardedOptimizer`` with ``muon(lr=0.02)`` at zero_stage 1 over the 2 ranks: each
  rank orthogonalises and updates the matrices the plan gave it (``update_s`` of ``opt.info``);
* the same optimizer over a group of one in each process (the unsharded update: every
  matrix on every rank, as DDP + Muon does);
* ``torch.optim.Muon`` on the same matrices in each process (the oracle's own speed).

Both processes compute at once in every contender, so each has one of the two cores;
one thread each. Bytes
are counted from the plan: a step reduce-scatters and allgathers every bucket, padding
included, so a rank sends ``2 (N - 1) / N`` of the padded buckets' bytes, where DDP's ring
allreduce sends ``2 (N - 1) / N`` of the gradients' bytes.
Run alone: ``python -m benchmarks.bench_muon [--quick]``.
"""
from __future__ import annotations

import os
import time

import torch

from benchmarks.common import ProcessPair, goal, goals_table, md_table, median, run_alone, serve

# bfloat16 matrix products run emulated on these CPUs (seconds per update at width 128), so
# the matrices stay small; on a GPU the same code runs at any width.
LAYERS, WIDTH, QUICK_WIDTH = 4, 128, 64
STEPS, QUICK_STEPS = 9, 2


def shapes(width: int) -> list[tuple[int, int]]:
    """The hidden matrices of ``LAYERS`` GPT blocks of width ``width`` (torch's Linear weight shapes)."""
    return [s for _ in range(LAYERS) for s in ((3 * width, width), (width, width), (4 * width, width),
                                              (width, 4 * width))]


def _rank(rank: int, world: int, cmds, results, width: int, port: int) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from distopt.collectives import TorchCommunicator, in_process
    from distopt.optim import ShardedOptimizer, muon
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(s, generator=g) * 0.02 for s in shapes(width)]

    def params():
        return [m.clone().requires_grad_() for m in mats]
    sharded = ShardedOptimizer(params(), muon(0.02), TorchCommunicator.from_process_group(None), zero_stage=1)
    alone = ShardedOptimizer(params(), muon(0.02), in_process(1)[0], zero_stage=1)
    ref_params = params()
    ref = torch.optim.Muon(ref_params, lr=0.02)
    grads = [torch.randn(s, generator=g) for s in shapes(width)]

    def torch_step() -> float:
        for p, gr in zip(ref_params, grads):
            p.grad = gr
        t0 = time.perf_counter()
        ref.step()
        return time.perf_counter() - t0

    def handle(cmd):
        if cmd == "plan":
            lay = sharded.plan.layout
            return {"padded": lay.total, "numel": sum(lay.numels), "buckets": len(lay.buckets),
                    "owned": sum(n for b in range(len(lay.buckets))
                                 for _, n, _ in sharded.rules.matrices(sharded.shard_rank, b))}
        if cmd == "torch":
            return torch_step()
        opt = sharded if cmd == "sharded" else alone
        opt.step(grads=grads)
        return opt.info.update_s
    try:
        serve(rank, cmds, results, handle)
    finally:
        dist.destroy_process_group()


def run(quick: bool = False) -> dict:
    """Interleave the contenders; returns per-rank medians, byte counts and goals."""
    from distopt.collectives import free_port
    width, steps = (QUICK_WIDTH, QUICK_STEPS) if quick else (WIDTH, STEPS)
    pair = ProcessPair(_rank, (width, free_port()), world=2)
    try:
        plan = pair.call("plan")
        times: dict[str, list[list[float]]] = {c: [[], []] for c in ("sharded", "alone", "torch")}
        for k in range(steps + 1):
            for c in times:
                for r, t in enumerate(pair.call(c)):
                    if k:  # the first step of each builds its state
                        times[c][r].append(t)
    finally:
        pair.close()
    ms = {c: [1e3 * median(ts) for ts in per_rank] for c, per_rank in times.items()}
    numel = plan[0]["numel"]
    ratio = [ms["sharded"][r] / ms["alone"][r] for r in range(2)]
    sent = plan[0]["padded"] / numel  # the padded buckets against the gradients, both times 2 (N - 1) / N
    goals = [goal(f"rank {r}: Muon update, sharded / unsharded", ratio[r], 0.6) for r in range(2)]
    goals.append(goal("bytes sent per step / DDP's", sent, 1.0))
    return {"width": width, "steps": steps, "numel": numel, "ms": ms, "plan": plan, "ratio": ratio,
            "bytes_ratio": sent, "goals": goals}


def markdown(result: dict) -> str:
    """The RESULTS.md section."""
    ms, plan = result["ms"], result["plan"]
    rows = [[c, f"{ms[c][0]:.1f}", f"{ms[c][1]:.1f}"] for c in ("sharded", "alone", "torch")]
    names = {"sharded": "distopt, 2 ranks, whole matrices per rank", "alone": "distopt, unsharded (group of one)",
             "torch": "torch.optim.Muon, one process"}
    rows = [[names[r[0]], *r[1:]] for r in rows]
    return "\n\n".join([
        f"{LAYERS} GPT blocks of width {result['width']}: {len(shapes(result['width']))} hidden matrices, "
        f"P_muon = {result['numel']:,}; Muon(lr=0.02), 5 Newton-Schulz steps in bfloat16; median of "
        f"{result['steps']} steps per contender, interleaved, both rank processes computing at once (one core each).",
        md_table(["update", "rank 0 ms", "rank 1 ms"], rows),
        f"Elements each rank updates: {plan[0]['owned']:,} and {plan[1]['owned']:,} of {result['numel']:,} (the "
        f"plan balances whole matrices by size). Padded buckets: {plan[0]['padded']:,} elements in "
        f"{plan[0]['buckets']} bucket(s), {result['bytes_ratio']:.4f}x the gradients: a rank sends "
        f"{result['bytes_ratio']:.4f}x DDP's bytes per step (reduce-scatter + allgather of the buckets against "
        f"DDP's allreduce of the gradients, both 2 (N - 1) / N of what they carry).",
        goals_table(result["goals"]),
    ])


if __name__ == "__main__":
    print(markdown(run_alone(__doc__, "smaller matrices, fewer steps", run)))
