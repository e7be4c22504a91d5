"""Mixed precision on the demo: fp32 against bf16 compute with bf16 gradients on the wire.

The ``make run`` task (noisy 8x8 digits, a small convnet, 2 workers, zero_stage 1, Adam)
trained twice with the same seed through ``distopt.Trainer`` on threads
(``ray_address="local"``, the same worker code as on Ray): once in fp32, once with
``mixed_precision="bf16"`` (autocast; fp32 master weights and optimizer state) and
``grad_wire_dtype=torch.bfloat16``. Recorded: the loss curves, the final loss, the
held-out accuracy, and the step time ratio. Run alone: ``python -m benchmarks.bench_precision``.
"""
from __future__ import annotations

import os

import torch

from benchmarks.common import md_table, median, run_alone, text_table

RUNS = {"fp32": {}, "bf16": {"mixed_precision": "bf16", "wire": torch.bfloat16}}


def _train(steps: int, wire: torch.dtype | None = None, **kw) -> dict:
    import distopt
    from launch import demo_task
    result = distopt.Trainer(
        model=demo_task.make_model, loss=demo_task.loss, data=demo_task.train_data(),
        optimizer=distopt.optim.adam(lr=3e-3), global_batch_size=64, zero_stage=1, seed=0,
        scaling=distopt.ScalingConfig(num_workers=2, ray_address="local", grad_wire_dtype=wire),
        run=distopt.RunConfig(log_every=0, progress=False), **kw).fit(steps=steps)
    model = demo_task.make_model()
    model.load_state_dict(result.state_dict)
    losses = [h["loss"] for h in result.history]
    return {"losses": losses, "first_loss": losses[0], "last_loss": median(losses[-20:]),
            "heldout_acc": demo_task.accuracy(model, demo_task.heldout_data()),
            "step_ms": 1e3 * median(h["time_s"] for h in result.history[5:])}


def run(quick: bool = False) -> dict:
    """Both runs; no goal (the issue asks for the effect to be recorded)."""
    steps = 120 if quick else 300
    rows = {name: _train(steps, **kw) for name, kw in RUNS.items()}
    return {"steps": steps, "rows": rows, "goals": []}


HEADERS = ["precision", "loss first", "loss last (median of 20)", "held-out accuracy", "step ms", "x fp32 step"]


def table_rows(result: dict) -> list[list[str]]:
    """One row per precision."""
    base = result["rows"]["fp32"]["step_ms"]
    return [[name, f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}", f"{100 * r['heldout_acc']:.1f}%",
             f"{r['step_ms']:.1f}", f"{r['step_ms'] / base:.2f}"] for name, r in result["rows"].items()]


def markdown(result: dict) -> str:
    """The RESULTS.md section."""
    return "\n\n".join([
        f"The demo task (`make run`), {result['steps']} steps, 2 workers (threads, no Ray), seed 0. bf16: forward "
        f"and backward under bf16 autocast, gradients sent as bf16 and summed in fp32, fp32 master weights and "
        f"Adam state. The step time here is a CPU's (bf16 autocast kernels and half the gradient bytes on "
        f"loopback); the point is the loss curve.",
        md_table(HEADERS, table_rows(result)),
    ])


def plot(result: dict, out_dir: str) -> str:
    """Both loss curves on one log-scale plot."""
    from benchmarks.plots import _save, plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, r in result["rows"].items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Demo loss: fp32 vs bf16 compute + bf16 gradients on the wire")
    ax.legend()
    return _save(fig, out_dir, "precision_loss.png")


def main() -> None:
    result = run_alone(__doc__, "fewer steps", run)
    print(text_table(HEADERS, table_rows(result)))
    print(plot(result, os.path.dirname(os.path.abspath(__file__))))


if __name__ == "__main__":
    main()
