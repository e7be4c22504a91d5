"""The plain torch loop under torchrun: ShardedOptimizer on the default gloo group with a
torch LR scheduler, equal to one process running torch.optim.AdamW on the global batch."""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distopt.collectives import free_port
from distopt.optim import ShardedOptimizer, adam

WORLD, STEPS, STAGES = 2, 4, (0, 1, 2)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))


def _groups(model: torch.nn.Module) -> list[dict]:
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(3, 6, generator=g), torch.randn(3, 2, generator=g)


def _schedule(s: int) -> float:
    return min(1.0, (s + 1) / 2)  # a short warm-up


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # what torchrun exports
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    out = {}
    for stage in STAGES:
        model = _model()
        opt = ShardedOptimizer(_groups(model), adam(3e-3, decoupled=True), zero_stage=stage)  # comm=None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
        for k in range(STEPS):
            x, y = _batch(k, rank)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        opt.close()
        out[stage] = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    results.put((rank, out))
    dist.destroy_process_group()


@pytest.mark.slow
def test_default_group_loop_with_lambda_lr_equals_one_process():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in range(WORLD))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    model = _model()
    ref = torch.optim.AdamW(_groups(model), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, _schedule)
    for k in range(STEPS):
        xs, ys = zip(*[_batch(k, r) for r in range(WORLD)])
        torch.nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        ref.step()
        ref.zero_grad()
        sched.step()
    for name, p in model.named_parameters():
        for r in range(WORLD):
            for stage in STAGES:
                torch.testing.assert_close(torch.from_numpy(got[r][stage][name]), p.detach(), rtol=1e-5, atol=1e-6)
