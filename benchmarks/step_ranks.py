"""The rank side of the step-time benchmark: one process per rank runs every contender.

Each rank process holds, side by side, torch DDP + ``torch.optim.Adam``, DDP +
``ZeroRedundancyOptimizer(Adam)`` (both on the default gloo group) and distopt runtime
``Worker``s (one per zero stage / fault-tolerance setting, each in its own group). The
driver asks for ``steps`` steps of one contender at a time, so contenders interleave with
no process start in between.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from benchmarks.common import serve

DIMS = (512, 2048, 2048, 512)  # 6,296,064 parameters
BATCH_PER_WORKER = 32
LR = 1e-3
SAMPLES = 64 * 64  # 64 global batches of 2 x 32
SEED = 0


def make_model() -> torch.nn.Module:
    """The benchmark MLP 512-2048-2048-512 (6.3M parameters)."""
    return torch.nn.Sequential(torch.nn.Linear(DIMS[0], DIMS[1]), torch.nn.ReLU(),
                               torch.nn.Linear(DIMS[1], DIMS[2]), torch.nn.ReLU(),
                               torch.nn.Linear(DIMS[2], DIMS[3]))


def mse_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """The distopt loss: ``(model, (x, y)) -> MSE``."""
    x, y = batch
    return F.mse_loss(model(x), y)


def make_data() -> TensorDataset:
    """Synthetic regression data, identical in every process."""
    g = torch.Generator().manual_seed(1234)
    return TensorDataset(torch.randn(SAMPLES, DIMS[0], generator=g), torch.randn(SAMPLES, DIMS[-1], generator=g))


def train_config(world: int, zero_stage: int, max_failures: int, overlap: bool = True,
                 batch_per_worker: int = BATCH_PER_WORKER, shared_memory: bool = True, log_depth: int = 4):
    """The distopt run description every contender shares."""
    import distopt
    from distopt.runtime.config import TrainConfig
    return TrainConfig(model=make_model, loss=mse_loss, data=make_data(), optimizer=distopt.optim.adam(lr=LR),
                       global_batch_size=batch_per_worker * world, zero_stage=zero_stage, seed=SEED, overlap=overlap,
                       scaling=distopt.ScalingConfig(num_workers=world),
                       failure=distopt.FailureConfig(max_failures=max_failures, shared_memory=shared_memory,
                                                     replica_log_depth=log_depth))


def _torch_runner(rank: int, world: int, data: TensorDataset, zero: bool) -> Callable[[int], dict]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from distopt.runtime.sampling import rank_indices
    torch.manual_seed(SEED)
    model = DDP(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=LR) if zero \
        else torch.optim.Adam(model.parameters(), lr=LR)
    x, y = data.tensors

    def step(k: int) -> dict:
        t0 = time.perf_counter()
        idx = rank_indices(len(data), BATCH_PER_WORKER * world, SEED, k, rank, world)
        opt.zero_grad(set_to_none=False)
        F.mse_loss(model(x[idx]), y[idx]).backward()  # DDP's allreduce overlaps the backward
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        return {"time_s": t2 - t0, "backward_s": t1 - t0, "optimizer_s": t2 - t1}
    return step


def _distopt_runner(rank: int, world: int, port: int, zero_stage: int, max_failures: int,
                    overlap: bool = True, batch_per_worker: int = BATCH_PER_WORKER,
                    shm: bool = True, log_depth: int = 4) -> Callable[[int], dict]:
    from distopt.runtime.worker import Worker
    worker = Worker(train_config(world, zero_stage, max_failures, overlap, batch_per_worker, shm, log_depth), rank)
    worker.connect("127.0.0.1", port, group_name=f"bench-s{zero_stage}-f{max_failures}-o{int(overlap)}"
                                                 f"-b{batch_per_worker}-m{int(shm)}-d{log_depth}")

    def step(k: int) -> dict:
        t0 = time.perf_counter()
        r = worker.run_step(k)
        return {"time_s": time.perf_counter() - t0, "data_s": r.data_s, "compute_s": r.compute_s,
                "comm_s": r.comm_s, "update_s": r.update_s}
    return step


def rank_main(rank: int, world: int, cmds, results, default_port: int, ports: dict[str, int],
              contenders: list[str], warmup: int) -> None:
    """A rank process: build every contender, warm each up, then serve ``(name, first, steps)``.

    Answers each command with one timing dict per step; ``"ready"`` once built.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{default_port}", rank=rank, world_size=world)
    data = make_data()
    runners: dict[str, Callable[[int], dict]] = {}
    for name in contenders:
        if name == "ddp":
            runners[name] = _torch_runner(rank, world, data, zero=False)
        elif name == "zero":
            runners[name] = _torch_runner(rank, world, data, zero=True)
        else:  # "rt-s{stage}-f{max_failures}", then "-nooverlap" (buckets reduced after backward),
            parts = name.split("-")  # "-b{samples per worker}", "-noshm" (the redundancy as across hosts),
            stage, failures = int(parts[1][1:]), int(parts[2][1:])  # "-d{replica_log_depth}"
            batch = next((int(p[1:]) for p in parts[3:] if p[0] == "b"), BATCH_PER_WORKER)
            depth = next((int(p[1:]) for p in parts[3:] if p[0] == "d"), 4)
            runners[name] = _distopt_runner(rank, world, ports[name], stage, failures, "nooverlap" not in parts,
                                            batch, "noshm" not in parts, depth)
        for k in range(warmup):
            runners[name](k)

    def handle(cmd) -> object:
        if cmd == "ping":
            return "ready"
        name, first, steps = cmd
        return [runners[name](k) for k in range(first, first + steps)]

    try:
        serve(rank, cmds, results, handle)
    finally:
        dist.destroy_process_group()
