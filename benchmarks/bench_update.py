"""Benchmark 3, the update kernel: distopt's Adam/SGD on a flat 10M-parameter shard.

One thread. distopt's rules (``distopt.optim.adam(...).update`` on a one-tensor list, and
``distopt.adam_update`` called directly) against ``torch.optim.Adam(fused=True)`` and
``foreach=True`` (and SGD against ``torch.optim.SGD``), as parameters/s and effective GB/s:
Adam moves 28 bytes per parameter (read p, g, m, v; write p, m, v), plain SGD 12 (read p,
g; write p) and, by the same count, SGD with momentum 20 (read p, g, buf; write p, buf; the
issue's 16 leaves out one of those). The yardstick is a measured copy (``dst.copy_(src)``,
8 bytes per element). Also timed: the gradient norm each sharded step takes
(``torch._foreach_norm`` with float64 accumulation, as ``ShardedOptimizer`` does) against
the float32 one. Calls alternate contender by contender (A B C A B C ...); medians are kept.
Run alone: ``python -m benchmarks.bench_update [--quick]``.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from benchmarks.common import goal, goals_table, md_table, median, print_goals, rotated, run_alone, text_table

NUMEL = 10_000_000
LR = 1e-3
BYTES = {"adam": 28, "sgd-momentum": 20, "sgd": 12, "copy": 8, "norm": 4}


def _torch_opt(cls, g: torch.Tensor, **kw) -> Callable[[int], None]:
    p = torch.nn.Parameter(torch.randn(NUMEL))
    p.grad = g
    opt = cls([p], lr=LR, **kw)
    return lambda step: opt.step()


def _distopt_rule(rule, g: torch.Tensor) -> Callable[[int], None]:
    p = torch.randn(NUMEL)
    state = rule.init([p])

    def call(step: int) -> None:
        rule.update([p], [g], state, step)
    return call


def _distopt_adam_update(g: torch.Tensor) -> Callable[[int], None]:
    import distopt
    p, m, v = torch.randn(NUMEL), torch.zeros(NUMEL), torch.zeros(NUMEL)

    def call(step: int) -> None:
        distopt.adam_update([p], [g], LR, [m], [v], step, epsilon=1e-8, inplace=True)
    return call


def contenders() -> dict[str, tuple[str, Callable[[int], None]]]:
    """name -> (kind, call(step)); kind picks the bytes per parameter."""
    import distopt
    g = torch.randn(NUMEL) * 1e-2
    src, dst = torch.randn(NUMEL), torch.empty(NUMEL)
    return {
        "copy dst.copy_(src)": ("copy", lambda step: dst.copy_(src)),
        "distopt adam rule.update": ("adam", _distopt_rule(distopt.optim.adam(lr=LR), g)),
        "distopt.adam_update": ("adam", _distopt_adam_update(g)),
        "torch Adam fused=True": ("adam", _torch_opt(torch.optim.Adam, g, fused=True)),
        "torch Adam foreach=True": ("adam", _torch_opt(torch.optim.Adam, g, foreach=True)),
        "distopt sgd momentum=0.9": ("sgd-momentum", _distopt_rule(distopt.optim.sgd(lr=LR, momentum=0.9), g)),
        "torch SGD momentum fused=True": ("sgd-momentum", _torch_opt(torch.optim.SGD, g, momentum=0.9, fused=True)),
        "torch SGD momentum foreach=True": ("sgd-momentum",
                                            _torch_opt(torch.optim.SGD, g, momentum=0.9, foreach=True)),
        "distopt sgd": ("sgd", _distopt_rule(distopt.optim.sgd(lr=LR), g)),
        "torch SGD fused=True": ("sgd", _torch_opt(torch.optim.SGD, g, fused=True)),
        "torch SGD foreach=True": ("sgd", _torch_opt(torch.optim.SGD, g, foreach=True)),
        # Not update rules: the gradient norm every ShardedOptimizer step takes, as it takes it
        # (float64 accumulation) and in float32.
        "grad norm, _foreach_norm float64": ("norm", lambda step: torch._foreach_norm([g], 2.0, dtype=torch.float64)),
        "grad norm, _foreach_norm float32": ("norm", lambda step: torch._foreach_norm([g], 2.0)),
    }


def run(quick: bool = False) -> dict:
    """Time every contender; returns rows (median seconds, Gparam/s, GB/s) and goals."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calls = contenders()
        times: dict[str, list[float]] = {k: [] for k in calls}
        for name, (_, call) in calls.items():  # warm-up: first touch of the state pages
            call(1)
            call(2)
        for rep in range(8 if quick else 40):
            for name in rotated(list(calls), rep):
                t0 = time.perf_counter()
                calls[name][1](rep + 3)
                times[name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    rows = {}
    for name, (kind, _) in calls.items():
        t = median(times[name])
        rows[name] = {"kind": kind, "ms": 1e3 * t, "gparam_s": NUMEL / t / 1e9, "gb_s": NUMEL * BYTES[kind] / t / 1e9}
    copy_bw = rows["copy dst.copy_(src)"]["gb_s"]
    for r in rows.values():
        r["of_copy"] = r["gb_s"] / copy_bw
    fused = {"adam": rows["torch Adam fused=True"], "sgd-momentum": rows["torch SGD momentum fused=True"],
             "sgd": rows["torch SGD fused=True"]}
    goals = [goal(f"{name} / {ref} (params/s)", rows[name]["gparam_s"] / fused[kind]["gparam_s"], 0.9, at_most=False)
             for name, kind, ref in [("distopt adam rule.update", "adam", "torch Adam fused"),
                                     ("distopt.adam_update", "adam", "torch Adam fused"),
                                     ("distopt sgd momentum=0.9", "sgd-momentum", "torch SGD momentum fused"),
                                     ("distopt sgd", "sgd", "torch SGD fused")]]
    return {"rows": rows, "goals": goals, "copy_gb_s": copy_bw, "numel": NUMEL}


HEADERS = ["contender", "bytes/param", "ms", "Gparam/s", "GB/s", "of copy bw", "x fused torch"]


def table_rows(result: dict) -> list[list[str]]:
    """One row per contender."""
    rows = result["rows"]
    fused = {"adam": "torch Adam fused=True", "sgd-momentum": "torch SGD momentum fused=True",
             "sgd": "torch SGD fused=True"}
    out = []
    for name, r in rows.items():
        ref = fused.get(r["kind"])
        out.append([name, BYTES[r["kind"]], f"{r['ms']:.2f}", f"{r['gparam_s']:.3f}", f"{r['gb_s']:.1f}",
                    f"{r['of_copy']:.2f}", f"{r['gparam_s'] / rows[ref]['gparam_s']:.3f}" if ref else ""])
    return out


def markdown(result: dict) -> str:
    """The RESULTS.md section."""
    return "\n\n".join([
        f"Flat fp32 shard of {result['numel']:,} parameters, one thread, median of interleaved calls. "
        f"Copy bandwidth measured alongside: {result['copy_gb_s']:.1f} GB/s.",
        md_table(HEADERS, table_rows(result)),
        goals_table(result["goals"]),
    ])


def main() -> None:
    result = run_alone(__doc__, "fewer repetitions", run)
    print(text_table(HEADERS, table_rows(result)))
    print_goals(result["goals"])


if __name__ == "__main__":
    main()
