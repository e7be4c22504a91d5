"""The rank side of the peak-memory benchmark: one fresh process per rank and configuration.

    python -m benchmarks.peak_memory_ranks '{"config": "distopt-s1-f3", "rank": 0, ...}'

Every rank process imports the same modules whatever it runs (torch DDP, ZeRO, FSDP2 and the
distopt runtime), so the bare-worker baseline (the same configuration on a tiny model)
cancels the imports. It builds ``layers`` x ``nn.Linear(width, width)`` (ReLU between), wraps
it as ``config`` says, trains ``steps`` Adam steps on random data, and prints one JSON line:
its peak resident memory (VmHWM) after building and after the steps, in bytes.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

import distopt
from benchmarks.step_ranks import mse_loss
from distopt.runtime.config import TrainConfig
from distopt.runtime.worker import Worker

LR = 1e-3
SEED = 0


def vm_hwm() -> int:
    """This process's peak resident set size so far (``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def make_model(layers: int, width: int) -> torch.nn.Module:
    """``layers`` x ``Linear(width, width)`` with ReLU between."""
    mods: list[torch.nn.Module] = []
    for i in range(layers):
        mods += [torch.nn.Linear(width, width)] + ([torch.nn.ReLU()] if i < layers - 1 else [])
    return torch.nn.Sequential(*mods)


def make_data(spec: dict) -> TensorDataset:
    """Random regression data, the same in every process: one global batch per step."""
    g = torch.Generator().manual_seed(1234)
    n = spec["steps"] * spec["batch"] * spec["world"]
    return TensorDataset(torch.randn(n, spec["width"], generator=g), torch.randn(n, spec["width"], generator=g))


def _torch_step(spec: dict) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A torch peer (``ddp``, ``zero``, ``fsdp-r0``/``fsdp-r1``) on the default gloo group."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=spec["rank"],
                            world_size=spec["world"], timeout=datetime.timedelta(seconds=spec["timeout_s"]))
    torch.manual_seed(SEED)
    model = make_model(spec["layers"], spec["width"])
    kind = spec["config"]
    if kind.startswith("fsdp"):
        mesh = init_device_mesh("cpu", (spec["world"],))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh, reshard_after_forward=kind == "fsdp-r1")
        fully_shard(model, mesh=mesh, reshard_after_forward=kind == "fsdp-r1")
    else:
        model = DDP(model)
    opt = (ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=LR) if kind == "zero"
           else torch.optim.Adam(model.parameters(), lr=LR))
    x, y = make_data(spec).tensors
    b, r, n = spec["batch"], spec["rank"], spec["world"]

    def step(k: int) -> None:
        rows = slice((k * n + r) * b, (k * n + r + 1) * b)
        opt.zero_grad()
        F.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
    return step, dist.barrier  # no rank leaves while the other is still in a collective


def _distopt_step(spec: dict) -> tuple[Callable[[int], None], Callable[[], None]]:
    """The distopt runtime's Worker (``distopt-s{stage}-f{max_failures}``), its own gloo group."""
    _, stage, failures = spec["config"].split("-")
    config = TrainConfig(model=functools.partial(make_model, spec["layers"], spec["width"]), loss=mse_loss,
                         data=make_data(spec), optimizer=distopt.optim.adam(lr=LR),
                         global_batch_size=spec["batch"] * spec["world"], zero_stage=int(stage[1:]), seed=SEED,
                         scaling=distopt.ScalingConfig(num_workers=spec["world"]),
                         failure=distopt.FailureConfig(max_failures=int(failures[1:]),
                                                       collective_timeout_s=float(spec["timeout_s"])))
    worker = Worker(config, spec["rank"], spec["world"])
    worker.connect("127.0.0.1", spec["port"], group_name=f"peak-{spec['config']}")
    return worker.run_step, worker.close


def main(spec: dict) -> dict:
    """Build, train, close, and report ``{"built": VmHWM, "trained": VmHWM}`` in bytes."""
    torch.set_num_threads(1)
    step, close = (_distopt_step if spec["config"].startswith("distopt") else _torch_step)(spec)
    built = vm_hwm()
    for k in range(spec["steps"]):
        step(k)
    close()  # after the fault tolerance's last background copy
    return {"rank": spec["rank"], "built": built, "trained": vm_hwm()}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
    # Leave without torch's teardown: freeing DDP's Reducer destroys the gloo group, whose
    # destructor waits, holding the GIL, for a run-loop thread that frees a finished
    # ZeroRedundancyOptimizer broadcast and needs the GIL (a hang in about half the runs, torch 2.13).
    os._exit(0)
