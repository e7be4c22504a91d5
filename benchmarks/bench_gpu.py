"""The GPU benchmark: update kernel, NCCL floor, one-GPU step time and mixed precision.

Needs one CUDA device and no Ray, so it runs where Ray is not installed. Sections:

1. Update kernel on flat fp32 shards of 100M-500M parameters: distopt's Adam
   (``rule.update`` and ``distopt.adam_update``) and SGD with momentum against
   ``torch.optim`` fused and foreach, timed with CUDA events, calls interleaved, medians.
   Effective bandwidth counts 28 bytes per parameter for Adam, 20 for SGD with momentum,
   8 per element for the reference copy.
2. NCCL floor at one rank: a 1-element allreduce through distopt's communicator (a real
   NCCL group of one, ``always_group=True``) against the raw ProcessGroupNCCL call.
3. Step time on one GPU: the step benchmark's MLP 512-2048-2048-512, batch 32 and 512,
   Adam: the distopt runtime ``Worker`` (zero stage 1, NCCL group of one) against DDP +
   ``torch.optim.Adam`` and against plain ``torch.optim.Adam(fused=True)`` with no DDP.
4. Mixed precision on the ``make run`` demo task with 2 workers sharing the GPU (threads,
   gloo with CUDA tensors): fp32 against bf16 autocast with bf16 gradients on the wire.
5. Fault tolerance at one rank: per-step cost of ``max_failures=3`` against 0, and the step
   that starts a background checkpoint against the others.

Writes ``gpu.json`` into ``--out`` (default ``benchmarks/``, where ``make bench`` reads it on
machines with no GPU) and prints the tables. Run: ``python -m benchmarks.bench_gpu [--out DIR]
[--quick] [--sections ...]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Callable

import torch

from benchmarks.common import HERE, goal, goals_table, md_table, median, rotated
from benchmarks.step_ranks import mse_loss

LR = 1e-3
BYTES = {"adam": 28, "sgd-momentum": 20, "copy": 8}
SECTIONS = ("update", "nccl", "step", "precision", "faults")
STORED = os.path.join(HERE, "gpu.json")


def _timed(calls: dict[str, Callable[[int], None]], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each contender, interleaved, timed with CUDA events."""
    for k in range(warmup):
        for call in calls.values():
            call(k + 1)
    events: dict[str, list] = {name: [] for name in calls}
    for rep in range(reps):
        for name in rotated(list(calls), rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[name](warmup + rep + 1)
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: median(s.elapsed_time(e) / 1e3 for s, e in pairs) for name, pairs in events.items()}


def _update_contenders(numel: int) -> dict[str, tuple[str, Callable[[int], None]]]:
    import distopt
    dev = torch.device("cuda")
    g = torch.randn(numel, device=dev) * 1e-2  # one gradient shared by every contender

    def torch_opt(cls, **kw):
        p = torch.nn.Parameter(torch.randn(numel, device=dev))
        p.grad = g
        opt = cls([p], lr=LR, **kw)
        return lambda step: opt.step()

    def rule_call(rule):
        p = torch.randn(numel, device=dev)
        state = rule.init([p])
        return lambda step: rule.update([p], [g], state, step)

    def adam_update_call():
        p, m, v = torch.randn(numel, device=dev), torch.zeros(numel, device=dev), torch.zeros(numel, device=dev)
        return lambda step: distopt.adam_update([p], [g], LR, [m], [v], step, epsilon=1e-8, inplace=True)

    src, dst = torch.randn(numel, device=dev), torch.empty(numel, device=dev)
    return {
        "copy dst.copy_(src)": ("copy", lambda step: dst.copy_(src)),
        "distopt adam rule.update": ("adam", rule_call(distopt.optim.adam(lr=LR))),
        "distopt.adam_update": ("adam", adam_update_call()),
        "torch Adam fused=True": ("adam", torch_opt(torch.optim.Adam, fused=True)),
        "torch Adam foreach=True": ("adam", torch_opt(torch.optim.Adam, foreach=True)),
        "distopt sgd momentum=0.9": ("sgd-momentum", rule_call(distopt.optim.sgd(lr=LR, momentum=0.9))),
        "torch SGD momentum fused=True": ("sgd-momentum", torch_opt(torch.optim.SGD, momentum=0.9, fused=True)),
    }


def bench_update(quick: bool) -> dict:
    """Section 1: rows per shard size and the >= 0.9x fused goals."""
    sizes = [100_000_000] if quick else [100_000_000, 250_000_000, 500_000_000]
    out, goals = {}, []
    for numel in sizes:
        contenders = _update_contenders(numel)
        secs = _timed({k: c for k, (_, c) in contenders.items()}, reps=10 if quick else 25)
        rows = {name: {"kind": kind, "ms": 1e3 * secs[name], "gparam_s": numel / secs[name] / 1e9,
                       "tb_s": numel * BYTES[kind] / secs[name] / 1e12} for name, (kind, _) in contenders.items()}
        for name in ("distopt adam rule.update", "distopt.adam_update"):
            rows[name]["x_fused"] = rows[name]["gparam_s"] / rows["torch Adam fused=True"]["gparam_s"]
            goals.append(goal(f"{name} / torch Adam fused, {numel // 10**6}M params", rows[name]["x_fused"], 0.9,
                              at_most=False))
        sgd = rows["distopt sgd momentum=0.9"]
        sgd["x_fused"] = sgd["gparam_s"] / rows["torch SGD momentum fused=True"]["gparam_s"]
        goals.append(goal(f"distopt sgd momentum / torch SGD fused, {numel // 10**6}M params", sgd["x_fused"], 0.9,
                          at_most=False))
        out[str(numel)] = rows
        del contenders
        torch.cuda.empty_cache()
    return {"sizes": out, "goals": goals}


def bench_nccl(quick: bool) -> dict:
    """Section 2: per-call latency of a 1-element allreduce at one rank."""
    import torch.distributed as dist
    from torch._C._distributed_c10d import AllreduceOptions

    from distopt.collectives import TorchCommunicator
    comm = TorchCommunicator(0, 1, backend="nccl", timeout_s=60, store=dist.HashStore(), always_group=True)
    try:
        t = torch.ones(1, device="cuda")
        raw_pg = comm._pg  # the same group, called without distopt's layer

        def raw(_: int) -> None:
            raw_pg.allreduce([t], AllreduceOptions()).wait()

        def ours(_: int) -> None:
            comm.allreduce(t)

        def host_sync(call):
            def timed(k: int) -> None:
                call(k)
                torch.cuda.synchronize()
            return timed
        calls = {"raw ProcessGroupNCCL.allreduce": host_sync(raw), "distopt allreduce": host_sync(ours)}
        for k in range(20):
            for c in calls.values():
                c(k)
        wall: dict[str, list[float]] = {k: [] for k in calls}
        for rep in range(200 if quick else 1000):
            for name in rotated(list(calls), rep):
                t0 = time.perf_counter()
                calls[name](rep)
                wall[name].append(time.perf_counter() - t0)
        rows = {k: {"us": 1e6 * median(v)} for k, v in wall.items()}
        ratio = rows["distopt allreduce"]["us"] / rows["raw ProcessGroupNCCL.allreduce"]["us"]
        version = torch.cuda.nccl.version()
        return {"rows": rows, "nccl_version": ".".join(map(str, version)) if isinstance(version, tuple) else str(version),
                "goals": [goal("distopt / raw NCCL allreduce latency, 1 element, 1 rank", ratio, 1.1)]}
    finally:
        comm.close()


def bench_step(quick: bool) -> dict:
    """Section 3: median step time on one GPU at batch 32 and 512."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from benchmarks.step_ranks import DIMS, make_model
    from distopt.collectives import TorchCommunicator
    from distopt.runtime.sampling import rank_indices
    from distopt.runtime.worker import Worker
    import distopt
    from distopt.runtime.config import TrainConfig

    dev = torch.device("cuda")
    torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    results = {}
    try:
        for batch in (32, 512):
            g = torch.Generator().manual_seed(1234)
            samples = 64 * batch
            data = torch.utils.data.TensorDataset(torch.randn(samples, DIMS[0], generator=g),
                                                  torch.randn(samples, DIMS[-1], generator=g))
            x, y = data.tensors

            def torch_step(model, opt):
                def step(k: int) -> None:
                    idx = rank_indices(samples, batch, 0, k, 0, 1)
                    xb, yb = x[idx].to(dev, non_blocking=True), y[idx].to(dev, non_blocking=True)
                    opt.zero_grad(set_to_none=False)
                    F.mse_loss(model(xb), yb).backward()
                    opt.step()
                return step

            torch.manual_seed(0)
            ddp = DDP(make_model().to(dev), device_ids=[0])
            torch.manual_seed(0)
            plain = make_model().to(dev)
            workers = {}
            for failures in (3, 0):  # fault tolerance on (the default) and off
                config = TrainConfig(model=make_model, loss=mse_loss, data=data, optimizer=distopt.optim.adam(lr=LR),
                                     global_batch_size=batch, zero_stage=1, seed=0,
                                     scaling=distopt.ScalingConfig(num_workers=1, use_gpu=True),
                                     failure=distopt.FailureConfig(max_failures=failures))
                workers[failures] = Worker(config, 0)
                workers[failures].attach(TorchCommunicator(0, 1, backend="nccl", timeout_s=60, store=dist.HashStore(),
                                                           always_group=True))
            calls = {
                "distopt Worker, zero_stage 1, NCCL": workers[3].run_step,
                "distopt Worker, zero_stage 1, NCCL, max_failures=0": workers[0].run_step,
                "DDP + torch.optim.Adam": torch_step(ddp, torch.optim.Adam(ddp.parameters(), lr=LR)),
                "torch.optim.Adam(fused=True), no DDP": torch_step(plain, torch.optim.Adam(plain.parameters(), lr=LR,
                                                                                              fused=True)),
            }
            for k in range(10):
                for c in calls.values():
                    c(k)
            torch.cuda.synchronize()
            wall: dict[str, list[float]] = {k: [] for k in calls}
            for rep in range(50 if quick else 200):
                for name in rotated(list(calls), rep):
                    t0 = time.perf_counter()
                    calls[name](10 + rep)
                    torch.cuda.synchronize()
                    wall[name].append(time.perf_counter() - t0)
            rows = {k: {"ms": 1e3 * median(v)} for k, v in wall.items()}
            for r in rows.values():
                r["x_ddp"] = r["ms"] / rows["DDP + torch.optim.Adam"]["ms"]
            results[str(batch)] = rows
            for w in workers.values():
                w.close()
    finally:
        dist.destroy_process_group()
    goals = [goal(f"distopt / DDP step time, 1 GPU, batch {b}", rows["distopt Worker, zero_stage 1, NCCL"]["x_ddp"],
                  1.0) for b, rows in results.items()]
    return {"batches": results, "goals": goals}


def bench_precision(quick: bool) -> dict:
    """Section 4: the demo task in fp32 and bf16 on 2 workers sharing the GPU."""
    import distopt
    from launch import demo_task
    steps = 120 if quick else 300
    rows = {}
    for name, (precision, wire) in {"fp32": (None, None), "bf16": ("bf16", "bfloat16")}.items():
        result = distopt.Trainer(
            model=demo_task.make_model, loss=demo_task.loss, data=demo_task.train_data(),
            optimizer=distopt.optim.adam(lr=3e-3), global_batch_size=64, zero_stage=1, seed=0,
            mixed_precision=precision,
            scaling=distopt.ScalingConfig(num_workers=2, use_gpu=True, ray_address="local", grad_wire_dtype=wire),
            run=distopt.RunConfig(log_every=0, progress=False)).fit(steps=steps)
        model = demo_task.make_model()
        model.load_state_dict({k: v.cpu() for k, v in result.state_dict.items()})
        losses = [h["loss"] for h in result.history]
        rows[name] = {"losses": losses, "first_loss": losses[0], "last_loss": median(losses[-20:]),
                      "heldout_acc": demo_task.accuracy(model, demo_task.heldout_data()),
                      "step_ms": 1e3 * median(h["time_s"] for h in result.history[5:])}
    return {"steps": steps, "rows": rows, "goals": []}


def bench_faults(quick: bool) -> dict:
    """Section 5: the fault-tolerance cost per step and the checkpoint step, at one rank.

    Three runtime Workers per model, each in an NCCL group of one, steps interleaved in
    rounds of 50: ``max_failures=0``, the default ``max_failures=3`` (at one rank there is
    no neighbour to replicate for, so this is the snapshot of the shard before each update
    that lets the rank undo it: a device copy), and ``max_failures=3`` writing a checkpoint
    every 50 steps with the writer process, a GPU rank's one checkpoint writer (runs stored
    before the writer thread's GPU path was removed also have a ``thread`` row). The
    checkpoint is a block's 10th step, so its write overlaps the same worker's next steps,
    up to the deadline of half an interval (25 steps), where a write still running is
    waited for. The checkpoint step's median over 12 rounds swung by 0.1-0.2 between runs
    of the same code, so the 6.3M model runs 30 rounds. Data lives on the GPU, so no
    host-to-device copy dilutes the ratios. A checkpoint write that fails raises: its time
    would mean nothing.
    """
    import tempfile

    import torch.distributed as dist

    import distopt
    from distopt.collectives import TorchCommunicator
    from distopt.runtime.config import TrainConfig
    from distopt.runtime.worker import Worker

    torch.cuda.set_device(0)
    cases = {"MLP 512-2048-2048-512 (6.3M), batch 512": ((512, 2048, 2048, 512), 512, 30),
             "MLP 4096-4096-4096-4096 (50.3M), batch 1024": ((4096, 4096, 4096, 4096), 1024, 12)}
    every = 50
    out = {}
    for label, (dims, batch, rounds) in cases.items():
        rounds = 2 if quick else rounds

        def make_model(dims=dims) -> torch.nn.Module:
            layers: list[torch.nn.Module] = []
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
            return torch.nn.Sequential(*layers[:-1])

        g = torch.Generator(device="cuda").manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(8 * batch, dims[0], device="cuda", generator=g),
                                              torch.randn(8 * batch, dims[-1], device="cuda", generator=g))
        with tempfile.TemporaryDirectory() as root:
            workers = {}
            for name, (failures, ckpt) in {"off": (0, {}), "on": (3, {}),
                                           "process": (3, {"dir": root, "every": every})}.items():
                config = TrainConfig(model=make_model, loss=mse_loss, data=data, optimizer=distopt.optim.adam(lr=LR),
                                     global_batch_size=batch, zero_stage=1, seed=0,
                                     scaling=distopt.ScalingConfig(num_workers=1, use_gpu=True),
                                     failure=distopt.FailureConfig(max_failures=failures),
                                     checkpoint=distopt.CheckpointConfig(**ckpt))
                workers[name] = Worker(config, 0)
                workers[name].attach(TorchCommunicator(0, 1, backend="nccl", timeout_s=60, store=dist.HashStore(),
                                                       always_group=True))
            times: dict[str, dict[int, float]] = {k: {} for k in workers}
            records: list[dict] = []
            for rnd in range(rounds + 1):  # round 0 warms up
                for name in rotated(list(workers), rnd):
                    first = every * (rnd + 1) - 10  # the checkpoint step is a block's 10th: its write overlaps the rest
                    for k in range(first, first + every):
                        t0 = time.perf_counter()
                        written = workers[name].run_step(k).checkpoints
                        # Training's stream only: a device-wide sync would also wait for the
                        # checkpoint's side-stream copies, which training itself never waits for.
                        torch.cuda.current_stream().synchronize()
                        if rnd:
                            times[name][k] = time.perf_counter() - t0
                        records.extend(written)
            for w in workers.values():
                records.extend(w.flush_checkpoints())
                w.close()
        failed = [r["error"] for r in records if "error" in r]
        if failed or len(records) != rounds + 1:
            raise RuntimeError(f"{label}: {len(records)} checkpoint writes for {rounds + 1} checkpoints, "
                               f"errors: {failed}")
        off, on = median(times["off"].values()), median(times["on"].values())
        ck = times["process"]
        ck_steps = median(t for k, t in ck.items() if (k + 1) % every == 0)
        plain = median(t for k, t in ck.items() if (k + 1) % every not in (0, 1))
        # The same worker's steps just before, long after its last write: no second
        # worker's drift between them (the CPU benchmark's goal is this ratio).
        before = median(t for k, t in ck.items() if (k + 1) % every in (every - 3, every - 2, every - 1))
        out[label] = {"off_ms": 1e3 * off, "on_ms": 1e3 * on, "ft_ratio": on / off, "every": every, "rounds": rounds,
                      "writer": "process", "checkpoint_step_ms": 1e3 * ck_steps,
                      "checkpoint_vs_before": ck_steps / before,
                      "after_checkpoint_ms": 1e3 * median(t for k, t in ck.items() if (k + 1) % every == 1),
                      "plain_ms": 1e3 * plain, "checkpoint_ratio": ck_steps / plain, "checkpoint_vs_on": ck_steps / on,
                      # Everything a checkpoint costs, deadline waits for slow writes included.
                      "lost_per_checkpoint_ms": 1e3 * (sum(ck.values()) - sum(times["on"].values())) / rounds}
        del data, workers
        torch.cuda.empty_cache()
    goals = []
    for label, r in out.items():
        goals.append(goal(f"per-step time, max_failures=3 / 0, {label}", r["ft_ratio"], 1.05))
        goals.append(goal(f"checkpoint step / same run's steps without checkpoints, {label}", r["checkpoint_vs_on"],
                          1.10))
    return {"cases": out, "goals": goals}


def facts() -> dict:
    """The device and library versions measured on."""
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run(quick: bool = False, sections: tuple[str, ...] = SECTIONS) -> dict:
    """Run the chosen sections; a failing section records its traceback and the rest go on.

    Without a CUDA device, returns the last GPU run stored in ``benchmarks/gpu.json``
    (marked ``stored``), so ``make bench`` on a CPU machine still reports it.
    """
    if not torch.cuda.is_available():
        if not os.path.exists(STORED):
            raise RuntimeError(f"no CUDA device here and no stored GPU results at {STORED}: "
                               f"run `python -m benchmarks.bench_gpu` on a GPU machine")
        with open(STORED, encoding="utf-8") as f:
            return {**json.load(f), "stored": True}
    out = {"facts": facts(), "quick": quick}
    for name in sections:
        t0 = time.perf_counter()
        try:
            out[name] = globals()[f"bench_{name}"](quick)
        except Exception:
            out[name] = {"error": traceback.format_exc(), "goals": []}
        out[name]["wall_s"] = time.perf_counter() - t0
        out[name]["facts"] = facts()
        print(f"[bench_gpu] {name} done in {out[name]['wall_s']:.1f}s", flush=True)
    out["goals"] = [{**g, "goal": f"GPU: {g['goal']}"} for s in sections for g in out[s].get("goals", [])]
    return out


def markdown(result: dict) -> str:
    """The RESULTS.md GPU section, from ``gpu.json``."""
    f = result["facts"]
    parts = [f"Measured on one {f['device']} ({f['sms']} SMs, {f['memory_gib']} GiB), torch {f['torch']} "
             f"(CUDA {f['cuda']}), {f['date']}, by `python -m benchmarks.bench_gpu` (Ray is not needed)."]
    if result.get("stored"):
        parts[0] += (" This machine has no GPU: these are the figures that run stored in `benchmarks/gpu.json`, "
                     "shown again, not measured now.")
    up = result.get("update", {})
    if "sizes" in up:
        rows = []
        for numel, table in up["sizes"].items():
            for name, r in table.items():
                rows.append([f"{int(numel) // 10**6}M", name, BYTES[r["kind"]], f"{r['ms']:.2f}",
                             f"{r['gparam_s']:.1f}", f"{r['tb_s']:.2f}", f"{r['x_fused']:.3f}" if "x_fused" in r else ""])
        parts += ["**Update kernel** (flat fp32 shard, CUDA events, median of interleaved calls):",
                  md_table(["params", "contender", "bytes/param", "ms", "Gparam/s", "TB/s", "x fused torch"], rows)]
    nc = result.get("nccl", {})
    if "rows" in nc:
        parts += [f"**NCCL floor at one rank** (NCCL {nc['nccl_version']}, 1-element allreduce, host-synchronised, "
                  f"median wall time):",
                  md_table(["call", "us"], [[k, f"{r['us']:.1f}"] for k, r in nc["rows"].items()])]
    st = result.get("step", {})
    if "batches" in st:
        rows = [[b, name, f"{r['ms']:.3f}", f"{r['x_ddp']:.2f}"] for b, table in st["batches"].items()
                for name, r in table.items()]
        parts += ["**Step time on one GPU** (MLP 512-2048-2048-512, Adam, host-synchronised median):",
                  md_table(["batch", "contender", "ms", "x DDP"], rows)]
    pr = result.get("precision", {})
    if "rows" in pr:
        base = pr["rows"]["fp32"]["step_ms"]
        parts += [f"**Mixed precision on the demo task** ({pr['steps']} steps, 2 workers sharing the GPU, gloo with "
                  f"CUDA tensors):",
                  md_table(["precision", "loss first", "loss last (median of 20)", "held-out accuracy", "step ms",
                            "x fp32 step"],
                           [[k, f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}", f"{100 * r['heldout_acc']:.1f}%",
                             f"{r['step_ms']:.1f}", f"{r['step_ms'] / base:.2f}"] for k, r in pr["rows"].items()])]
    ft = result.get("faults", {})
    if "cases" in ft:
        rows = [[label, f"{r['off_ms']:.2f}", f"{r['on_ms']:.2f}", f"{r['ft_ratio']:.3f}", f"{r.get('rounds', '')}"]
                for label, r in ft["cases"].items()]
        when = f" measured {ft['facts']['date']} on a {ft['facts']['device']}" if "facts" in ft else ""
        parts += [f"**Fault tolerance on one GPU**{when} (runtime Worker, NCCL group of one, Adam, zero stage 1; at one rank "
                  "there is no neighbour to replicate for, so max_failures=3 costs the device copy of the shard that "
                  "lets the rank undo an update; the replicas' traffic between GPUs is not in these figures):",
                  md_table(["model", "max_failures=0 ms", "max_failures=3 ms", "ratio", "rounds of 50 steps"], rows)]

        def ck_row(label: str, writer: str, r: dict) -> list:
            return [label, writer, f"{r['plain_ms']:.2f}", f"{r['checkpoint_step_ms']:.2f}",
                    f"{r['after_checkpoint_ms']:.2f}", f"{r['checkpoint_ratio']:.3f}",
                    f"{r['checkpoint_vs_on']:.3f}" if "checkpoint_vs_on" in r else "",
                    f"{r['checkpoint_vs_before']:.3f}" if "checkpoint_vs_before" in r else "",
                    f"{r.get('lost_per_checkpoint_ms', float('nan')):.1f}"]
        # Runs stored before the writer thread's GPU path was removed: the thread alone (no
        # "writer"), or the process with the thread's row beside it, shown as history.
        rows = [ck_row(label, r.get("writer", "process" if "thread" in r else "thread"), r)
                for label, r in ft["cases"].items()]
        rows += [ck_row(label, "thread", r["thread"]) for label, r in ft["cases"].items() if "thread" in r]
        thread = ("; rows of the writer thread are from before its GPU path was removed, kept as history"
                  if any(row[1] == "thread" for row in rows) else "")
        parts += [f"**Checkpoint every 50 steps** (max_failures=3, local disk; the writer process is a GPU rank's "
                  f"one checkpoint writer{thread}):",
                  md_table(["model", "writer", "plain step ms", "checkpoint step ms", "step after ms",
                            "checkpoint / plain", "checkpoint / max_failures=3 steps", "checkpoint / 3 steps before",
                            "ms lost per checkpoint (all steps)"], rows)]
        if ft.get("note"):  # written by hand into gpu.json: how this run was chosen, what else was measured
            parts += [ft["note"]]
    runs = result.get("faults_runs", [])
    if runs:  # kept by hand from earlier device calls: one call's rows ran on one machine
        parts += ["**Fault-tolerance section across code versions** (each row one `python -m benchmarks.bench_gpu "
                  "--sections faults` run, or the section of a full run; one device call is one fresh machine, and "
                  "within a call the versions ran one after the other from their own checkouts; compare rows of one "
                  "call only):",
                  md_table(["call", "code", "rounds", "writer", "6.3M per-step", "6.3M checkpoint / plain",
                            "6.3M checkpoint / max_failures=3", "50.3M per-step", "50.3M checkpoint / plain",
                            "50.3M checkpoint / max_failures=3", "when"],
                           [[r["call"], r["code"], r["rounds"], r.get("writer", "thread")]
                            + [f"{r[m][k]:.3f}" if k in r[m] else "" for m in ("6.3M", "50.3M")
                               for k in ("ft_ratio", "checkpoint_ratio", "checkpoint_vs_on")]
                            + [r["date"]] for r in runs])]
    if result.get("goals"):
        parts += [goals_table(result["goals"])]
    errors = [f"{s}: {result[s]['error'].strip().splitlines()[-1]}" for s in SECTIONS if "error" in result.get(s, {})]
    if errors:
        parts += ["Sections that failed: " + "; ".join(errors)]
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=HERE, help="folder for gpu.json (default: benchmarks/, where make bench reads it)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA device; the CPU benchmarks are `make bench`")
    result = run(args.quick, tuple(args.sections))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


if __name__ == "__main__":
    main()
