"""The peer of the recovery benchmark: Ray Train's TorchTrainer (DDP) losing a worker.

Same model, data, batch and optimizer as distopt's run. A checkpoint every 10 steps
(synchronous, as Ray Train does it), ``FailureConfig(max_failures=1)``, and rank 1
killed with SIGKILL once at step ``kill_at``; Ray Train restarts every worker from the
last checkpoint. Rank 0 logs each step's start and end to a file the driver reads.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from benchmarks.common import median, paired_ratio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY = 10


def _loop(cfg: dict) -> None:
    import torch
    import torch.nn.functional as F
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from benchmarks import step_ranks
    from distopt.runtime.sampling import rank_indices
    torch.set_num_threads(1)
    torch.manual_seed(step_ranks.SEED)
    model = ray.train.torch.prepare_model(step_ranks.make_model())
    opt = torch.optim.Adam(model.parameters(), lr=step_ranks.LR)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    x, y = step_ranks.make_data().tensors
    for k in range(start, cfg["steps"]):
        if rank == 1 and k == cfg["kill_at"] and not os.path.exists(cfg["marker"]):
            open(cfg["marker"], "w").close()
            os.kill(os.getpid(), 9)
        t0 = time.time()
        idx = rank_indices(len(x), step_ranks.BATCH_PER_WORKER * world, step_ranks.SEED, k, rank, world)
        opt.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
        if (k + 1) % EVERY == 0:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": k + 1},
                               os.path.join(d, "state.pt"))
                ray.train.report({"step": k + 1}, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
        if rank == 0:
            with open(cfg["log"], "a") as f:
                f.write(json.dumps({"step": k, "start": t0, "end": time.time()}) + "\n")


def run(steps: int, kill_at: int) -> dict:
    """Train with one SIGKILL; the gap it caused, the steps redone, the checkpoint stall."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"steps": steps, "kill_at": kill_at, "marker": os.path.join(tmp, "killed"),
               "log": os.path.join(tmp, "steps.jsonl")}
        ray.init(address="local", num_cpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
        try:
            TorchTrainer(_loop, train_loop_config=cfg,
                         scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name="bench", storage_path=os.path.join(tmp, "store"),
                                              failure_config=FailureConfig(max_failures=1))).fit()
        finally:
            ray.shutdown()
        with open(cfg["log"]) as f:
            entries = [json.loads(line) for line in f]
    return summarize(entries, kill_at)


def summarize(entries: list[dict], kill_at: int) -> dict:
    """Gap, steps redone and checkpoint stall from rank 0's step log (in the order written)."""
    restart = next(i for i in range(1, len(entries)) if entries[i]["step"] <= entries[i - 1]["step"])
    before, after = entries[:restart], entries[restart:]
    last_before = max(e["end"] for e in before if e["step"] == kill_at - 1)
    first_again = min(e["end"] for e in after if e["step"] == kill_at)
    times = {e["step"]: e["end"] - e["start"] for e in before[5:]}
    marked = [s for s in times if (s + 1) % EVERY == 0]
    ckpt = [times[s] for s in marked]
    plain = [t for s, t in times.items() if (s + 1) % EVERY]
    # The same estimator as distopt's goal row: each checkpoint step against the 3 steps before it.
    return {"gap_s": first_again - last_before, "steps_redone": kill_at - after[0]["step"],
            "normal_step_s": median(plain), "checkpoint_step_s": median(ckpt),
            "checkpoint_stall_ratio": paired_ratio(times, marked), "pooled_stall_ratio": median(ckpt) / median(plain)}
