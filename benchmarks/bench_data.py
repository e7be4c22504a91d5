"""Data loading: the time a step waits for its data, with and without background loading,
against a torch ``DataLoader``; and the read throughput of ``distopt.data.shards``.

Part 1. A map-style dataset whose every sample costs ``c`` of CPU time (a spin on the
thread's CPU clock, standing for decoding or tokenising) feeds one MLP worker
(``distopt.Trainer``, ``ray_address="local"``, one worker). ``c`` is set so that loading a
batch takes 0.25, 0.5 and 1.0 of the step's compute (measured first, with ``c = 0``).
Contenders: distopt with ``num_data_workers=0`` (loading on the training thread) and ``=1``
(one loader process, ``prefetch=2``), and a plain loop over a torch ``DataLoader`` with 0
and 1 worker feeding the same model and ``torch.optim.Adam``. Recorded per step: the time,
and the time it waited for its batch (distopt's ``data_s``). Goal: with background loading,
when a batch takes at most half a step's compute to load, the wait is at most 5% of the step.

Part 2. ``.npy`` shards of int32 token rows: one epoch read through ``distopt.data.shards``
(one rank, shuffle buffer 1024, rows memory-mapped and collated) against the same files read
in a plain loop (the same per-row collation, and one slice per batch). The files were just
written, so both read from the page cache. Run alone: ``python -m benchmarks.bench_data``.
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from benchmarks.common import goal, md_table, median, run_alone, text_table

BATCH, WIDTH, SAMPLES = 64, 512, 4096
FRACTIONS = (0.25, 0.5, 1.0)  # batch load time / step compute


class CostlyRows(Dataset):
    """Random rows, each costing ``cost_s`` of this thread's CPU time to "decode"."""

    def __init__(self, cost_s: float, n: int = SAMPLES) -> None:
        self.x = torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(0))
        self.cost_s = cost_s

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        t0 = time.thread_time()
        while time.thread_time() - t0 < self.cost_s:
            pass
        return self.x[i]


def make_model() -> torch.nn.Module:
    layers = [m for _ in range(3) for m in (torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.GELU(),
                                             torch.nn.Linear(2 * WIDTH, WIDTH))]
    return torch.nn.Sequential(*layers)


def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return (model(batch) - batch).pow(2).mean()


def _distopt(cost_s: float, loaders: int, steps: int) -> dict:
    import distopt
    result = distopt.Trainer(model=make_model, loss=loss, data=CostlyRows(cost_s), optimizer=distopt.optim.adam(1e-3),
                             global_batch_size=BATCH, num_data_workers=loaders, prefetch=2,
                             scaling=distopt.ScalingConfig(num_workers=1, ray_address="local"),
                             failure=distopt.FailureConfig(max_failures=0),
                             run=distopt.RunConfig(log_every=0, progress=False)).fit(steps=steps)
    kept = result.history[5:]
    return {"step_ms": 1e3 * median(h["time_s"] for h in kept), "wait_ms": 1e3 * median(h["data_s"] for h in kept),
            "compute_ms": 1e3 * median(h["compute_s"] + h["comm_s"] + h["update_s"] for h in kept)}


def _torch(cost_s: float, loaders: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(CostlyRows(cost_s), batch_size=BATCH, shuffle=True, drop_last=True, num_workers=loaders,
                        prefetch_factor=2 if loaders else None, generator=torch.Generator().manual_seed(0))
    it, steps_ms, waits_ms = iter(loader), [], []
    for k in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        opt.zero_grad()
        loss(model, batch).backward()
        opt.step()
        if k >= 5:
            steps_ms.append(1e3 * (time.perf_counter() - t0))
            waits_ms.append(1e3 * (t1 - t0))
    return {"step_ms": median(steps_ms), "wait_ms": median(waits_ms)}


def _loading(quick: bool) -> dict:
    steps = 20 if quick else 40
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # a core for the loader process, for every contender
    try:
        return _contenders(steps)
    finally:
        torch.set_num_threads(threads)


def _contenders(steps: int) -> dict:
    compute_ms = _distopt(0.0, 0, steps)["compute_ms"]
    rows = []
    for f in FRACTIONS:
        cost_s = f * compute_ms / 1e3 / BATCH
        row = {"fraction": f, "cost_us": 1e6 * cost_s}
        for name, run in (("distopt", _distopt), ("torch", _torch)):
            for loaders in (0, 1):
                row[f"{name} W={loaders}"] = run(cost_s, loaders, steps)
        rows.append(row)
    return {"steps": steps, "compute_ms": compute_ms, "rows": rows, "threads": torch.get_num_threads()}


def read_npy(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _shards(quick: bool) -> dict:
    from distopt.data import Feed, shards
    count, rows, width = (4, 2048, 256) if quick else (8, 4096, 256)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # memory-mapped rows are read-only: torch warns once per process
        paths = [f"{folder}/shard-{i}.npy" for i in range(count)]
        for i, p in enumerate(paths):
            np.save(p, np.random.default_rng(i).integers(0, 50_000, (rows, width), dtype=np.int32))
        total = count * rows // BATCH * BATCH
        out = {"shards": count, "rows": rows, "width": width, "bytes": count * rows * width * 4}
        times: dict[str, list[float]] = {"shards": [], "loop rows": [], "loop slices": []}
        for _ in range(3):  # interleaved, medians kept
            t0 = time.perf_counter()
            feed, position = Feed(shards(paths, read_npy), 0, BATCH, 1, torch.device("cpu")), None
            for step in range(total // BATCH):
                _, position, _ = feed.batches(step, position, 0, 1)
            times["shards"].append(time.perf_counter() - t0)
            for name, batch_of in (("loop rows", lambda a, i: default_collate([a[j] for j in range(i, i + BATCH)])),
                                   ("loop slices", lambda a, i: torch.from_numpy(np.array(a[i:i + BATCH])))):
                t0 = time.perf_counter()
                for p in paths:
                    a = np.load(p, mmap_mode="r")
                    for i in range(0, len(a) - BATCH + 1, BATCH):
                        batch_of(a, i)
                times[name].append(time.perf_counter() - t0)
        out["samples_per_s"] = {k: total / median(v) for k, v in times.items()}
    return out


def run(quick: bool = False) -> dict:
    """Both parts; the goal on data wait with background loading."""
    loading, reading = _loading(quick), _shards(quick)
    goals = [goal(f"data wait / step, num_data_workers=1, batch load = {r['fraction']:g} x compute",
                  r["distopt W=1"]["wait_ms"] / r["distopt W=1"]["step_ms"], 0.05)
             for r in loading["rows"] if r["fraction"] <= 0.5]
    return {"loading": loading, "reading": reading, "goals": goals}


LOAD_HEADERS = ["batch load / compute", "CPU per sample (us)", "contender", "step ms", "waits for data ms",
                "wait / step"]
READ_HEADERS = ["reader", "samples/s", "MB/s", "x plain loop (rows)"]


def loading_rows(result: dict) -> list[list[str]]:
    out = []
    for r in result["loading"]["rows"]:
        for name in ("distopt W=0", "distopt W=1", "torch W=0", "torch W=1"):
            m = r[name]
            out.append([f"{r['fraction']:g}", f"{r['cost_us']:.0f}", name.replace("W=", "num_workers="),
                        f"{m['step_ms']:.1f}", f"{m['wait_ms']:.2f}", f"{100 * m['wait_ms'] / m['step_ms']:.1f}%"])
    return out


def reading_rows(result: dict) -> list[list[str]]:
    r = result["reading"]
    per_sample = r["width"] * 4
    base = r["samples_per_s"]["loop rows"]
    return [[name, f"{v:,.0f}", f"{v * per_sample / 1e6:.0f}", f"{v / base:.2f}"]
            for name, v in r["samples_per_s"].items()]


def markdown(result: dict) -> str:
    """The RESULTS.md section."""
    lo, rd, m = result["loading"], result["reading"], result.get("meta", {})
    return "\n\n".join([
        f"Measured on {m.get('cores', '?')} cores ({m.get('cpu', '?')}), torch {m.get('torch', '?')}; CPU "
        f"training only. Part 1: one worker, an MLP step of {lo['compute_ms']:.1f} ms compute (batch {BATCH}, width {WIDTH}), "
        f"{lo['steps']} steps, medians over all but the first 5. distopt `num_workers=1` is the loader-process "
        f"count (`num_data_workers`), torch's its `DataLoader(num_workers=...)`; both prefetch 2 batches per "
        f"process. Training runs {lo.get('threads', '?')} torch threads, leaving a core to the loader process. "
        f"distopt hands each batch over on a thread of its own (`distopt/data/loader.py`), torch's loop takes it "
        f"on the training thread.",
        md_table(LOAD_HEADERS, loading_rows(result)),
        f"Part 2: one epoch of {rd['shards']} `.npy` shards x {rd['rows']} rows x {rd['width']} int32 tokens "
        f"({rd['bytes'] / 1e6:.0f} MB) in batches of {BATCH}, page cache warm, median of 3 interleaved rounds. "
        f"`shards`: `distopt.data.shards(paths, np.load(mmap_mode='r'))` through one rank's `Feed` (shard "
        f"permutation, shuffle buffer 1024, per-row reads and `default_collate`); plain loop (rows): each file "
        f"in order, the same per-row `default_collate`; plain loop (slices): one array slice per batch.",
        md_table(READ_HEADERS, reading_rows(result)),
    ])


def main() -> None:
    from benchmarks.common import print_goals
    result = run_alone(__doc__, "fewer steps and smaller shards", run)
    print(text_table(LOAD_HEADERS, loading_rows(result)))
    print(text_table(READ_HEADERS, reading_rows(result)))
    print_goals(result["goals"])


if __name__ == "__main__":
    main()
