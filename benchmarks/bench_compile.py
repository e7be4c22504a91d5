"""torch.compile on the ``make run`` GPT: a worker's step time, eager against compiled.

One worker's step as the runtime runs it, without Ray: ``zero_grad``, forward and backward
of ``launch.gpt`` (bucket reductions started by the gradient hooks), then
``ShardedOptimizer.step`` on a group of one (``in_process(1)``), with one thread as a Ray
worker of one CPU has. The eager and the compiled model (``nn.Module.compile``, inductor)
start from the same weights and take their steps interleaved (A B A B ...), so the
machine's drift hits both; the first compiled steps, which compile, are timed apart.
Run alone: ``python -m benchmarks.bench_compile``.
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import md_table, median, run_alone, text_table

SIZES = {  # name: (GPTConfig kwargs, per-worker batch)
    "make run GPT": ({"block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 64}, 32),
    "GPT 4x128, block 128": ({"block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128}, 16),
}
WARMUP = 3  # steps before timing; a compiled model compiles in the first


class _Runner:
    """One model, its optimizer on a group of one, and a fixed batch."""

    def __init__(self, comm, config, batch: int, compiled: bool) -> None:
        from distopt.optim import ShardedOptimizer, adam
        from launch import gpt
        torch.manual_seed(0)
        self.model = gpt.GPT(config)
        if compiled:
            self.model.compile()
        self.opt = ShardedOptimizer(self.model.named_parameters(), adam(1e-3), comm, zero_stage=1)
        g = torch.Generator().manual_seed(1)
        idx = torch.randint(0, gpt.VOCAB, (batch, config.block_size + 1), generator=g)
        self.batch, self.loss = [idx[:, :-1], idx[:, 1:]], gpt.loss

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad()
        self.loss(self.model, self.batch).backward()
        self.opt.step()
        return time.perf_counter() - t0


def _measure(kwargs: dict, batch: int, steps: int) -> dict:
    from distopt.collectives import in_process
    from launch import gpt
    config = gpt.GPTConfig(**kwargs)
    comm = in_process(1)[0]
    runners = {"eager": _Runner(comm, config, batch, False), "compiled": _Runner(comm, config, batch, True)}
    try:
        first = {name: [r.step() for _ in range(WARMUP)] for name, r in runners.items()}
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(steps):
            for name, r in runners.items():
                times[name].append(r.step())
        params = sum(p.numel() for p in runners["eager"].model.parameters())
        return {"params": params, "tokens": batch * config.block_size, "compile_s": first["compiled"][0],
                "eager_ms": 1e3 * median(times["eager"]), "compiled_ms": 1e3 * median(times["compiled"])}
    finally:
        for r in runners.values():
            r.opt.close()
        comm.close()


def run(quick: bool = False) -> dict:
    """Both sizes; recorded, no goal (the issue asks for the measurement)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = 5 if quick else 20
        return {"steps": steps, "rows": {name: _measure(kw, b, steps) for name, (kw, b) in SIZES.items()},
                "goals": []}
    finally:
        torch.set_num_threads(threads)


HEADERS = ["model", "parameters", "tokens per step", "eager ms", "compiled ms", "compiled / eager",
           "first compiled step s"]


def table_rows(result: dict) -> list[list[str]]:
    """One row per model size."""
    return [[name, f"{r['params']:,}", f"{r['tokens']:,}", f"{r['eager_ms']:.1f}", f"{r['compiled_ms']:.1f}",
             f"{r['compiled_ms'] / r['eager_ms']:.2f}", f"{r['compile_s']:.1f}"] for name, r in result["rows"].items()]


def markdown(result: dict) -> str:
    """The RESULTS.md section."""
    return "\n\n".join([
        f"One worker's step (zero_grad, forward, backward with the bucket hooks, ShardedOptimizer.step at "
        f"stage 1 on a group of one; no Ray), one thread, fp32, eager and `nn.Module.compile()` (inductor) "
        f"interleaved, median of {result['steps']} steps each after {WARMUP} warm-up steps. The first compiled "
        f"step includes the compilation (a warm inductor cache makes it shorter).",
        md_table(HEADERS, table_rows(result)),
    ])


def main() -> None:
    result = run_alone(__doc__, "5 timed steps instead of 20", run)
    print(text_table(HEADERS, table_rows(result)))


if __name__ == "__main__":
    main()
