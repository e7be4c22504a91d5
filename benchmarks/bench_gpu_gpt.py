"""On one GPU, no Ray: a GPT-2-small-sized model's training step, and peak memory per rank.

1. ``gpt``: ``launch.gpt.GPT`` at GPT-2-small's depth and width (12 layers, 12 heads, width
   768, context 1024; byte vocabulary), bf16 autocast, batch ``BATCH`` x 1024 tokens. distopt's
   ``ShardedOptimizer`` (AdamW, ``decay_groups``, zero_stage 1, a group of one: what a world-1
   worker runs) against a plain loop with ``torch.optim.AdamW(fused=True)`` and the same
   groups; each eager and under ``torch.compile``. Steps interleave contender by contender
   (A B C D A B ...), timed with CUDA events; medians. MFU counts 6 x P x tokens (plus the
   attention's 12 x layers x width x context per token) against 989 TFLOP/s, bf16 dense.
2. ``memory``: ``torch.cuda.max_memory_allocated`` of one rank training 16 x Linear(4096,
   4096) (268M parameters, fp32, Adam) for 3 steps: plain ``torch.optim.Adam(fused=True)``,
   DDP + Adam on an NCCL group of one, and distopt at zero_stage 0, 1 and 2 (group of one).

Run: ``python -m benchmarks.bench_gpu_gpt [--out DIR] [--quick]``; writes ``gpu_gpt.json``.
On a machine without a GPU, ``make bench`` shows the stored ``benchmarks/gpu_gpt.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import HERE, goal, goals_table, md_table, median

STORED = os.path.join(HERE, "gpu_gpt.json")
BATCH, STEPS, WARMUP = 16, 12, 3
PEAK_FLOPS = 989e12


def _gpt(compiled: bool, quick: bool):
    from launch import gpt
    size = dict(block_size=128, n_layer=2, n_head=2, n_embd=64) if quick else \
        dict(block_size=1024, n_layer=12, n_head=12, n_embd=768)
    config = gpt.GPTConfig(**size)
    torch.manual_seed(0)
    model = gpt.GPT(config).to("cuda")
    if compiled:
        model.compile()
    return model, config


def _contender(kind: str, compiled: bool, quick: bool, batch):
    from distopt.collectives import in_process
    from distopt.optim import ShardedOptimizer, adam, decay_groups
    from launch import gpt
    model, config = _gpt(compiled, quick)
    groups = decay_groups(model, 0.1)
    if kind == "distopt":
        opt = ShardedOptimizer(groups, adam(3e-4, weight_decay=0.1, decoupled=True), in_process(1)[0], zero_stage=1)
    else:
        opt = torch.optim.AdamW([{**g, "params": [p for _, p in g["params"]]} for g in groups], lr=3e-4,
                                weight_decay=0.1, fused=True)

    def step() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = gpt.loss(model, batch)
        loss.backward()
        opt.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return step, sum(p.numel() for p in model.parameters()), config


def gpt_section(quick: bool) -> dict:
    """Tokens/s and MFU of distopt and the fused-AdamW loop, eager and compiled."""
    from launch import gpt
    block = 128 if quick else 1024
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, gpt.VOCAB, (BATCH, block + 1), generator=g).cuda()
    batch = [idx[:, :-1], idx[:, 1:]]
    names = [(k, c) for c in (False, True) for k in ("torch fused AdamW", "distopt")]
    runners, first = {}, {}
    for kind, compiled in names:
        name = f"{kind}{', compiled' if compiled else ''}"
        step, params, config = _contender("distopt" if kind == "distopt" else "torch", compiled, quick, batch)
        t0 = time.perf_counter()
        for _ in range(WARMUP):
            step()
        first[name] = time.perf_counter() - t0
        runners[name] = step
    times = {n: [] for n in runners}
    for _ in range(STEPS):
        for n, step in runners.items():
            times[n].append(step())
    tokens = BATCH * block
    flops = 6 * params * tokens + 12 * config.n_layer * config.n_embd * block * tokens
    rows = {n: {"step_ms": 1e3 * median(ts), "tokens_s": tokens / median(ts),
                "mfu": flops / median(ts) / PEAK_FLOPS, "warmup_s": first[n]} for n, ts in times.items()}
    goals = [goal(f"distopt / torch fused AdamW tokens/s{suffix}", rows[f"distopt{suffix}"]["tokens_s"]
                  / rows[f"torch fused AdamW{suffix}"]["tokens_s"], 0.95, at_most=False)
             for suffix in ("", ", compiled")]
    return {"params": params, "tokens_per_step": tokens, "rows": rows, "goals": goals}


def memory_section(quick: bool) -> dict:
    """Peak allocated bytes of one rank for each configuration, 3 steps each."""
    import torch.distributed as dist
    from distopt.collectives import in_process
    from distopt.optim import ShardedOptimizer, adam
    width, layers = (512, 4) if quick else (4096, 16)
    x = torch.randn(64, width, device="cuda")
    out = {}
    for name in ("torch Adam fused", "DDP + Adam", "distopt stage 0", "distopt stage 1", "distopt stage 2"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).cuda()
        if name.startswith("distopt"):
            net, opt = model, ShardedOptimizer(model.parameters(), adam(1e-4), in_process(1)[0],
                                               zero_stage=int(name[-1]))
        elif name == "DDP + Adam":
            if not dist.is_initialized():
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
                dist.init_process_group("nccl", rank=0, world_size=1)
            net = torch.nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        else:
            net, opt = model, torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            opt.step()
        torch.cuda.synchronize()
        out[name] = torch.cuda.max_memory_allocated() - base
        del net, opt, model
    params = layers * width * width
    return {"params": params, "peak_bytes": out, "formula": {"stage 1/2 at N=1: 4P weights + 4P grads + 8P state":
                                                             16 * params}}


def markdown(result: dict) -> str:
    """The RESULTS.md section, from ``gpu_gpt.json``."""
    g, m = result["gpt"], result["memory"]
    rows = [[n, f"{r['step_ms']:.1f}", f"{r['tokens_s']:,.0f}", f"{100 * r['mfu']:.1f}%", f"{r['warmup_s']:.1f}"]
            for n, r in g["rows"].items()]
    mem = [[n, f"{b / 2**20:,.0f}", f"{b / m['params']:.2f}"] for n, b in m["peak_bytes"].items()]
    return "\n\n".join([
        f"{result.get('device', 'GPU')}, torch {result.get('torch', '?')}, {result.get('date', '?')}: "
        f"`python -m benchmarks.bench_gpu_gpt` (no Ray; where no GPU is, `make bench` shows this stored run). GPT at GPT-2-small's depth and width, {g['params']:,} parameters (byte vocabulary), "
        f"{g['tokens_per_step']:,} tokens per step, bf16 autocast, AdamW with decay groups; one rank.",
        md_table(["contender", "step ms", "tokens/s", "MFU", "first steps s"], rows),
        goals_table(g["goals"]),
        f"Peak `torch.cuda.max_memory_allocated` of one rank above what was allocated before, "
        f"{m['params']:,}-parameter MLP (fp32, Adam), 3 steps:",
        md_table(["configuration", "peak MiB", "bytes per parameter"], mem),
    ])


def run(quick: bool = False) -> dict:
    """Both sections on the GPU; without one, the stored result."""
    if not torch.cuda.is_available():
        with open(STORED, encoding="utf-8") as f:
            return json.load(f)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpt": gpt_section(quick),
            "memory": memory_section(quick)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=HERE)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    result = run(args.quick)
    with open(os.path.join(args.out, "gpu_gpt.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))
