"""The pictures RESULTS.md links: bus bandwidth, step time, state and peak memory, predicted scaling.

Each function takes a benchmark's result dict, writes one PNG into ``out_dir`` and returns
its file name; none of them measures anything.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

COLORS = {"data": "#bbbbbb", "compute": "#4c72b0", "comm": "#dd8452", "update": "#55a868", "other": "#8172b3"}


def busbw(result: dict, out_dir: str) -> str:
    """Bus bandwidth against message size, distopt against raw gloo."""
    sizes = result["sizes"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"distopt allreduce": ("C0", "-"), "gloo all_reduce": ("C0", "--"),
              "distopt rs+ag": ("C1", "-"), "gloo rs+ag": ("C1", "--"), "distopt rs": ("C2", "-"),
              "gloo rs": ("C2", "--"), "distopt ag": ("C4", "-"), "gloo ag": ("C4", "--"),
              "gloo a2a rs": ("C3", ":")}
    for op, (color, ls) in styles.items():
        ax.plot(sizes, [result["busbw"][str(s)][op] for s in sizes], color=color, ls=ls, marker="o", ms=4, label=op)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [f"{s // 2**20}M" if s >= 2**20 else f"{s // 2**10}K" for s in sizes])
    ax.set_xlabel("message size (bytes, fp32)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title("2 ranks, gloo over loopback: distopt vs raw torch.distributed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, out_dir, "collectives_busbw.png")


def _bar_parts(s: dict) -> list[tuple[str, float]]:
    if "compute_ms" in s:
        parts = [("data", s.get("data_ms", 0.0)), ("compute", s["compute_ms"]), ("comm", s.get("comm_ms", 0.0)),
                 ("update", s.get("update_ms", 0.0))]
    else:  # a peer: forward+backward (allreduce overlapped) and optimizer.step()
        parts = [("compute", s["backward_ms"]), ("update", s["optimizer_ms"])]
    known = sum(v for _, v in parts)
    if known > s["time_ms"]:  # per-phase maxima over ranks overlap: shares of the step, scaled to it
        return [(k, v * s["time_ms"] / known) for k, v in parts]
    return parts + [("other", s["time_ms"] - known)]


def step_bars(result: dict, out_dir: str) -> str:
    """Median step time per contender, split where the contender reports a split."""
    from benchmarks.bench_step import label
    summary = result["summary"]
    phases = sorted({k.split(":")[0] for k in summary})
    fig, axes = plt.subplots(1, len(phases), figsize=(7 * len(phases), 5.5), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        keys = [k for k in summary if k.startswith(phase + ":")]
        for i, key in enumerate(keys):
            bottom = 0.0
            for part, ms in _bar_parts(summary[key]):
                ax.bar(i, ms, bottom=bottom, color=COLORS[part], label=part if i == 0 or part == "data" else None)
                bottom += ms
        ax.axhline(summary[f"{phase}:ddp"]["time_ms"], color="k", ls=":", lw=1, label="DDP")
        ax.set_xticks(range(len(keys)), [_short(label(k.split(":")[1])) for k in keys], rotation=35, ha="right",
                      fontsize=8)
        ax.set_ylabel("median step time (ms)")
        ax.set_title({"A": "phase A: no Ray", "B": "phase B: Ray up"}.get(phase, phase))
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Median step time, 2 workers, MLP 6.3M, batch 32/worker, Adam. Peers: compute = fwd+bwd with "
                 "overlapped allreduce, update = optimizer.step.\nTrainer: per-phase shares scaled to the step "
                 "where the per-rank maxima overlap; other = Ray, controller and what no phase timer covers",
                 fontsize=9)
    return _save(fig, out_dir, "step_time.png")


def _short(text: str) -> str:
    return (text.replace("DDP + ZeroRedundancyOptimizer(Adam)", "ZeRO (torch)").replace("DDP + torch.optim.Adam", "DDP")
            .replace("distopt runtime, no Ray, ", "runtime ").replace("distopt Trainer on Ray, ", "Trainer ")
            .replace("distopt Worker, ", "distopt ").replace("reshard_after_forward=", "reshard=")
            .replace("max_failures=", "mf="))


def memory(result: dict, out_dir: str) -> str:
    """Optimizer-state bytes per worker against N, with the ideal 8P/N."""
    rows = result["rows"]
    worlds = sorted({r["world"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage, color, size in zip((0, 1, 2), ("C0", "C1", "C2"), (6, 10, 5)):
        pts = [r for r in rows if r["stage"] == stage and not r["replicate"]]
        ax.plot([r["world"] for r in pts], [r["state_bytes_max"] / 2**20 for r in pts], marker="o", ms=size,
                color=color, label=f"stage {stage}: Adam state" + (" (= stage 1)" if stage == 2 else ""))
        red = [r for r in rows if r["stage"] == stage and r["replicate"]]
        ax.plot([r["world"] for r in red], [(r["state_bytes_max"] + r["redundancy_bytes"]) / 2**20 for r in red],
                marker="x", ms=size + 2, ls="--", color=color, alpha=0.7,
                label=f"stage {stage}: + redundancy (max_failures>0)" + (" (= stage 1)" if stage == 2 else ""))
    ideal = [8 * result["num_params"] / n / 2**20 for n in worlds]
    ax.plot(worlds, ideal, color="k", ls=":", label="ideal 8P/N")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(worlds, [str(n) for n in worlds])
    ax.set_xlabel("workers N")
    ax.set_ylabel("MiB per worker")
    ax.set_title(f"Optimizer state per worker, P = {result['num_params']:,}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "state_memory.png")


def peak_memory(result: dict, out_dir: str) -> str:
    """Peak resident memory per worker over the bare worker, per configuration, with ZeRO's formulas."""
    from benchmarks.bench_peak_memory import label
    names = list(result["rows"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 2.2))
    colors = ["C0" if n.endswith("-f0") else "C1" if n.startswith("distopt") else "0.55" for n in names]
    ax.barh(range(len(names)), [result["rows"][n]["peak_mb"] for n in names], color=colors)
    ax.set_yticks(range(len(names)), [_short(label(n)) for n in names], fontsize=8)
    ax.invert_yaxis()
    absolute = [f for f in result["formulas"] if f.get("goal") != "ft"]  # the redundancy's bound is a difference
    for f, color, ls in zip(absolute, ("k", "C2", "C4", "C2", "C4"), (":", "-", "-", "--", "--")):
        ax.axvline(f["bytes"] / 1e6, color=color, ls=ls, lw=1, label=f["name"])
    ax.set_xlabel("peak resident MB per worker over the bare worker (max over ranks)")
    steps = result["steps"]
    ax.set_title(f"Peak memory per worker, P = {result['num_params']:,}, N = {result['world']}, Adam, "
                 f"{steps['torch']} (torch) or {steps['distopt']} (distopt) steps\n"
                 f"(grey: torch peers; blue: distopt max_failures=0, orange: =3)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, out_dir, "peak_memory.png")


def scaling(rows: list[dict], out_dir: str) -> str:
    """The cost model's predicted scaling efficiency and memory per GPU against the number of GPUs."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {("100 Gb/s", 25): "C0", ("100 Gb/s", 256): "C9", ("400 Gb/s", 25): "C3", ("400 Gb/s", 256): "C1"}
    for (link, bucket), color in colors.items():
        for model, ls, marker in (("1B", "-", "o"), ("7B", "--", "s")):
            pts = [r for r in rows if (r["model"], r["link"], r["bucket_mb"]) == (model, link, bucket)]
            ax1.plot([r["n"] for r in pts], [r["efficiency"] for r in pts], color=color, ls=ls, marker=marker, ms=4,
                     label=f"{model}, {link}, {bucket} MB buckets")
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("compute / step time (1 = perfect scaling)")
    ax1.set_title("predicted scaling efficiency, stage 1, H100 at 40% MFU, 8 samples x 2048 tokens per GPU,\n"
                  "fp32 gradients on the wire (1B and 7B nearly coincide: both terms scale with P)", fontsize=9)
    for model, color in (("1B", "C0"), ("7B", "C3")):
        pts = [r for r in rows if r["model"] == model and r["link"] == "400 Gb/s" and r["bucket_mb"] == 25]
        for key, ls, name in (("memory_stage0_gb", ":", "stage 0"), ("memory_gb", "-", "stage 1"),
                              ("memory_stage2_gb", "--", "stage 2")):
            ax2.plot([r["n"] for r in pts], [r[key] for r in pts], color=color, ls=ls, label=f"{model} {name}")
    ax2.axhline(80, color="k", lw=0.8, label="H100 80 GB")
    ax2.set_ylabel("GB per GPU")
    ax2.set_title("predicted memory per GPU: fp32 params + grads + Adam state\n(no activations, no redundancy)",
                  fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "scaling_model.png")


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name
