"""Benchmark 4, memory and traffic of the sharded optimizer, counted exactly.

N = 1, 2, 4, 8 ranks in one process (``distopt.collectives.in_process`` + ``run_ranks``), the
step benchmark's 6.3M-parameter MLP, Adam:

* optimizer-state bytes per worker (``ShardedOptimizer.state_bytes()``) against the ideal
  ``8 x P / N`` at zero_stage >= 1; the excess is the plan's zero padding. The in-memory
  redundancy that fault tolerance keeps is reported beside it (``Redundancy.nbytes()``), as
  across hosts (``shared_memory=False``: the replica, the received gradients, and the copies
  and gradient log that undo a rank's own update) and as on one host (shared memory: the
  neighbour's replica, and below stage 2 the gradient shard beside the gradient buckets).
* bytes each worker sends per step, counted by :class:`CountingComm`, a thin proxy around
  the TorchCommunicator that adds up what each collective sends under the ring algorithm,
  against DDP's ``2(N-1)/N x 4 x P`` (ZeroRedundancyOptimizer's is about 1.5x that).

Run alone: ``python -m benchmarks.bench_memory [--quick]``.
"""
from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import goal, goals_table, md_table, print_goals, run_alone, text_table

WORLDS = (1, 2, 4, 8)
ODD_NUMELS = (1_000_003, 4_099, 7)  # sizes no N divides: the padding remainder shows
STEPS = 2  # counted steps per configuration (after one uncounted step)


class CountingComm:
    """A Communicator that forwards every call and counts the bytes this rank sends.

    Ring accounting: allreduce ``2(n-1)/n x bytes``; reduce_scatter and allgather
    ``(n-1)/n x`` the full (padded) buffer; all_to_all ``(n-1)/n x bytes``; ``shift``
    sends its whole tensor to one neighbour (``1 x bytes``); broadcast counts
    ``(n-1) x bytes`` on the source (gloo sends from the root to each rank), 0 elsewhere.
    """

    def __init__(self, inner: Any) -> None:
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.sent: dict[str, float] = {}

    def _add(self, op: str, nbytes: float) -> None:
        self.sent[op] = self.sent.get(op, 0.0) + nbytes

    def _frac(self) -> float:
        return (self.world_size - 1) / self.world_size

    @staticmethod
    def _wire(t: torch.Tensor, wire_dtype: torch.dtype | None) -> int:
        return (wire_dtype or t.dtype).itemsize

    def _padded(self, numel: int) -> int:
        return -(-numel // self.world_size) * self.world_size

    # Extra keywords (async_op=...) pass through untouched: the bytes are the same.
    def allreduce(self, t, op="sum", wire_dtype=None, **kw):
        self._add("allreduce", 2 * self._frac() * t.numel() * self._wire(t, wire_dtype))
        return self.inner.allreduce(t, op, wire_dtype, **kw)

    def reduce_scatter(self, flat, op="sum", wire_dtype=None, out=None, **kw):
        self._add("reduce_scatter", self._frac() * self._padded(flat.numel()) * self._wire(flat, wire_dtype))
        return self.inner.reduce_scatter(flat, op, wire_dtype, out=out, **kw)

    def allgather(self, shard, numel=None, out=None, **kw):
        total = self._padded(numel) if numel is not None else shard.numel() * self.world_size
        self._add("allgather", self._frac() * total * shard.element_size())
        return self.inner.allgather(shard, numel, out=out, **kw)

    def all_to_all(self, t, **kw):
        self._add("all_to_all", self._frac() * t.numel() * t.element_size())
        return self.inner.all_to_all(t, **kw)

    def shift(self, t, out=None, **kw):
        self._add("shift", float(t.numel() * t.element_size()) if self.world_size > 1 else 0.0)
        return self.inner.shift(t, out=out, **kw)

    def broadcast(self, t, src=0, **kw):
        if self.rank == src:
            self._add("broadcast", float((self.world_size - 1) * t.numel() * t.element_size()))
        return self.inner.broadcast(t, src, **kw)

    def __getattr__(self, name: str) -> Any:  # barrier, close, anything else: forwarded
        return getattr(self.inner, name)


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    """The MLP's parameters by name, as the runtime's Worker passes them (names shape the buckets)."""
    from benchmarks.step_ranks import make_model
    torch.manual_seed(seed)
    return {n: p.detach().clone().requires_grad_() for n, p in make_model().named_parameters()}


def _one_rank(comm, stage: int, replicate: bool, steps: int, shm: bool) -> dict:
    import os

    import distopt
    from distopt.ft import Redundancy
    from distopt.optim import ShardedOptimizer
    params = _params()
    counting = CountingComm(comm)
    opt = ShardedOptimizer(params, distopt.optim.adam(lr=1e-3), counting, zero_stage=stage)
    red = Redundancy(opt, shared_memory=shm) if replicate else None
    if replicate and shm and os.environ.get("DISTOPT_SHM", "1") != "0" and stage >= 1 and comm.world_size > 1:
        assert red.shared, "the in-process ranks share a host: the shared-memory path must have formed"
    g = torch.Generator().manual_seed(comm.rank)
    grads = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in params.items()}

    def step() -> None:
        if red is not None:
            red.commit(opt.step_count)  # as the worker does before each step
        opt.step(grads=grads)
    step()  # not counted: the first step, and the construction's broadcast
    counting.sent.clear()
    for _ in range(steps):
        step()
    return {"state_bytes": opt.state_bytes(), "redundancy_bytes": red.nbytes() if red is not None else 0,
            "sent": {k: v / steps for k, v in counting.sent.items()}, "shard_numel": opt.plan.shard_numel(),
            "buckets": len(opt.plan.layout.buckets)}


def measure(world: int, stage: int, replicate: bool, steps: int, shm: bool = False) -> dict:
    """One configuration on ``world`` in-process ranks; the rank with the most bytes sent.

    ``shm=False`` (the default) measures the redundancy as across hosts, where what it
    sends goes over the wire; the in-process ranks share a host, so it would otherwise take
    the shared-memory path.
    """
    from distopt.collectives import in_process, run_ranks
    comms = in_process(world, timeout_s=120.0)
    try:
        per_rank = run_ranks(comms, lambda c: _one_rank(c, stage, replicate, steps, shm))
    finally:
        for c in comms:
            c.close()
    worst = max(per_rank, key=lambda r: sum(r["sent"].values()))
    return {**worst, "sent_total": sum(worst["sent"].values()),
            "state_bytes_max": max(r["state_bytes"] for r in per_rank)}


def _odd_state(world: int) -> dict:
    """State bytes of an awkwardly sized parameter list at stage 1 (construction only)."""
    import distopt
    from distopt.collectives import in_process, run_ranks
    from distopt.optim import ShardedOptimizer
    comms = in_process(world, timeout_s=60.0)
    try:
        def build(c) -> tuple[int, int]:
            opt = ShardedOptimizer([torch.zeros(n, requires_grad=True) for n in ODD_NUMELS], distopt.optim.adam(lr=1e-3), c, zero_stage=1)
            return opt.state_bytes(), len(opt.plan.layout.buckets)
        per_rank = run_ranks(comms, build)
    finally:
        for c in comms:
            c.close()
    p = sum(ODD_NUMELS)
    return {"world": world, "params": p, "state_bytes_max": max(b for b, _ in per_rank), "ideal_state": 8 * p / world,
            "buckets": per_rank[0][1]}


def run(quick: bool = False) -> dict:
    """Every N x stage x redundancy; returns rows and goals."""
    num_params = sum(p.numel() for p in _params().values())
    worlds = (1, 2, 4) if quick else WORLDS
    rows = []
    for n in worlds:
        for stage in (0, 1, 2):
            for replicate in (False, True):
                m = measure(n, stage, replicate, 1 if quick else STEPS)
                if replicate:
                    m["redundancy_bytes_shm"] = \
                        measure(n, stage, True, 1, shm=True)["redundancy_bytes"]
                ideal_state = 8 * num_params / (n if stage >= 1 else 1)
                ddp = 2 * (n - 1) / n * 4 * num_params
                rows.append({"world": n, "stage": stage, "replicate": replicate, **m, "ideal_state": ideal_state,
                             "ddp_bytes": ddp, "zero_bytes": 1.5 * ddp})
                print(f"  N={n} stage={stage} redundancy={replicate}: state {m['state_bytes_max']:,} B, "
                      f"sent {m['sent_total']:,.0f} B/step", flush=True)
    odd = [_odd_state(n) for n in worlds]
    # Exactly 8P/N but for the plan's padding, which DESIGN.md bounds as O(1): under 32
    # elements (the alignment) x 8 B of Adam state per bucket.
    goals = [goal(f"state B - 8P/N (padding), P={r.get('params', num_params):,}, N={r['world']}, "
                  f"stage {r.get('stage', 1)}, {r['buckets']} bucket(s)", r["state_bytes_max"] - r["ideal_state"],
                  8 * 32 * r["buckets"])
             for r in rows + odd if r.get("stage", 1) >= 1 and not r.get("replicate", False) and r["world"] > 1]
    for r in rows:
        if r["stage"] >= 1 and not r["replicate"] and r["world"] > 1:
            # DDP's bytes exactly, plus the one fp64 scalar of the global gradient norm
            # (DDP does not compute one): at most 2 x 8 B on the ring.
            goals.append(goal(f"bytes sent - DDP's (B; the gradient-norm scalar), N={r['world']}, "
                              f"stage {r['stage']}", r["sent_total"] - r["ddp_bytes"], 16))
    return {"num_params": num_params, "rows": rows, "odd": odd, "goals": goals}


STATE_HEADERS = ["N", "stage", "state B/worker", "ideal 8P/N (or 8P)", "padding remainder B", "x ideal",
                 "+ redundancy B (max_failures>0), across hosts", "one host"]
TRAFFIC_HEADERS = ["N", "stage", "redundancy", "sent B/step/worker", "by collective", "x DDP", "over DDP B",
                   "x ZeRO (1.5 DDP)"]


def state_rows(result: dict) -> list[list[str]]:
    """Optimizer state per worker, one row per N and stage (redundancy from the replicate run)."""
    red = {(r["world"], r["stage"]): r for r in result["rows"] if r["replicate"]}
    return [[r["world"], r["stage"], f"{r['state_bytes_max']:,}", f"{r['ideal_state']:,.0f}",
             f"{r['state_bytes_max'] - r['ideal_state']:,.0f}", f"{r['state_bytes_max'] / r['ideal_state']:.6f}",
             f"{red[(r['world'], r['stage'])]['redundancy_bytes']:,}",
             f"{red[(r['world'], r['stage'])].get('redundancy_bytes_shm', 0):,}"]
            for r in result["rows"] if not r["replicate"]]


def odd_rows(result: dict) -> list[list[str]]:
    """State per worker for the awkwardly sized list: the padding remainder."""
    return [[r["world"], 1, f"{r['state_bytes_max']:,}", f"{r['ideal_state']:,.1f}",
             f"{r['state_bytes_max'] - r['ideal_state']:,.1f}", f"{r['state_bytes_max'] / r['ideal_state']:.6f}", "",
             ""] for r in result["odd"]]


def traffic_rows(result: dict) -> list[list[str]]:
    """Bytes sent per worker per step, one row per configuration with N > 1."""
    out = []
    for r in result["rows"]:
        if r["world"] == 1:
            continue
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(r["sent"].items()))
        out.append([r["world"], r["stage"], "on" if r["replicate"] else "off", f"{r['sent_total']:,.0f}", parts,
                    f"{r['sent_total'] / r['ddp_bytes']:.6f}", f"{r['sent_total'] - r['ddp_bytes']:,.0f}",
                    f"{r['sent_total'] / r['zero_bytes']:.3f}"])
    return out


def markdown(result: dict) -> str:
    """The RESULTS.md section."""
    p = result["num_params"]
    return "\n\n".join([
        f"P = {p:,} parameters (the step benchmark's MLP), Adam, fp32, 25 MB buckets, in-process gloo ranks. "
        f"State is exact (`state_bytes()`); traffic is counted per collective by a proxy communicator "
        f"(ring accounting; `shift` counts its whole tensor, it goes to one neighbour). DDP sends "
        f"2(N-1)/N x 4P bytes per step. Without redundancy stages 1/2 send DDP's bytes plus the 8-byte "
        f"allreduce of the gradient norm (8 x 2(N-1)/N B); the redundancy's ring `shift` adds 4P/N B. The "
        f"redundancy is measured as across hosts (`shared_memory=False`: the replica, the received gradient shard, "
        f"and the copies and gradient log that undo a rank's own update, `replica_log_depth` = 4; at stage 0 or "
        f"N = 1 a snapshot of the shard); ranks on one host share memory instead (no shift: the last column, the "
        f"neighbour's replica and below stage 2 the gradient shard beside the gradient buckets).",
        md_table(STATE_HEADERS, state_rows(result)),
        f"The plan pads every bucket to a multiple of N x 32 elements, so each rank's shard exceeds P/N by less "
        f"than 32 elements per bucket: less than 8 x 32 = 256 B of Adam state per bucket (the MLP has "
        f"{result['rows'][0].get('buckets', '?')} bucket(s)). An awkward list "
        f"({' + '.join(f'{n:,}' for n in ODD_NUMELS)} = {sum(ODD_NUMELS):,} elements) shows the remainder too:",
        md_table(STATE_HEADERS[:-2], [r[:-2] for r in odd_rows(result)]),
        md_table(TRAFFIC_HEADERS, traffic_rows(result)),
        goals_table(result["goals"]),
    ])


def main() -> None:
    result = run_alone(__doc__, "N up to 4, one counted step", run)
    print(text_table(STATE_HEADERS, state_rows(result) + odd_rows(result)))
    print(text_table(TRAFFIC_HEADERS, traffic_rows(result)))
    print_goals(result["goals"])


if __name__ == "__main__":
    main()
