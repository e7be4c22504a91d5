"""The ``make run`` main job: a small convnet learns noisy 8x8 digits on a local Ray cluster.

Two workers train data-parallel with ZeRO stage 1 (each keeps half of Adam's state) on
data generated in :mod:`launch.demo_task`. The driver then loads the final weights into a
fresh model and measures held-out accuracy, which climbs from chance (~10%) to over 90%.

    python launch/demo.py                    # writes runs/demo/{metrics.jsonl,loss.png,summary.json,demo.json}
    python launch/demo.py --out /tmp/x --steps 100
"""
from __future__ import annotations

import argparse
import os
import sys
import time

STARTED = time.monotonic()  # the wall time reported includes imports and the Ray start
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from anywhere; the Trainer passes sys.path on to the workers

import torch  # noqa: E402  (after the path set-up above)

import distopt  # noqa: E402
from launch import demo_task  # noqa: E402
from launch.report import state_bytes_line, write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's few options; the defaults are what ``make run`` runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers, one CPU each (default: 2)")
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2), help="ZeRO stage (default: 1)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the sampling (default: 0)")
    p.add_argument("--log-every", type=int, default=25, help="log period without a terminal (default: 25)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: bf16 autocast compute and bf16 gradients on the wire, fp32 master weights "
                        "and optimizer state (default: fp32)")
    return p.parse_args(argv)


def heldout_accuracy(state_dict: dict | None, seed: int) -> float:
    """Held-out accuracy of a fresh model with ``state_dict`` (None: as initialised).

    The model is built after ``torch.manual_seed(seed)``, as every worker builds it, so
    with ``state_dict=None`` this is the accuracy the run started from.
    """
    torch.manual_seed(seed)
    model = demo_task.make_model()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return demo_task.accuracy(model, demo_task.heldout_data())


def report(args: argparse.Namespace, result, acc_before: float, acc_after: float, wall_s: float) -> dict:
    """Print the run's summary and return it as plain data (also written to demo.json)."""
    summary = dict(result.summary or {})
    history = result.history
    num_params = sum(t.numel() for t in result.state_dict.values())
    first, last = history[0]["loss"], history[-1]["loss"]
    steps_per_s = summary.get("steps_per_s") or len(history) / sum(e["time_s"] for e in history)
    lines = [
        "",
        f"demo: {len(history)} steps, {args.workers} workers, ZeRO-{args.zero_stage}, Adam lr {args.lr:g}, "
        f"batch {args.batch_size}, {num_params:,} parameters",
        f"loss              {first:.4f} -> {last:.4f}",
        f"held-out accuracy {acc_before:.1%} -> {acc_after:.1%}  ({len(demo_task.heldout_data())} unseen samples)",
        f"speed             {steps_per_s:.1f} steps/s, {steps_per_s * args.batch_size:,.0f} samples/s",
        state_bytes_line(summary, num_params, args.workers, args.zero_stage),
        f"recovered failures {len(result.failures)}",
        f"wall time         {wall_s:.1f} s (imports and Ray start included)",
        f"output            {os.path.abspath(args.out)}",
    ]
    print("\n".join(lines), flush=True)
    return {"steps": len(history), "first_loss": first, "last_loss": last, "heldout_acc_before": acc_before,
            "heldout_acc_after": acc_after, "steps_per_s": steps_per_s, "num_params": num_params,
            "state_bytes_per_worker": summary.get("state_bytes_per_worker"),
            "state_bytes_unsharded": summary.get("state_bytes_unsharded"), "wall_s": wall_s}


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate on the driver, print the summary; returns the exit status."""
    args = parse_args(argv)
    trainer = distopt.Trainer(
        model=demo_task.make_model, loss=demo_task.loss, data=demo_task.train_data(),
        optimizer=distopt.optim.adam(lr=args.lr), global_batch_size=args.batch_size,
        zero_stage=args.zero_stage, seed=args.seed, mixed_precision="bf16" if args.precision == "bf16" else None,
        scaling=distopt.ScalingConfig(num_workers=args.workers,
                                      grad_wire_dtype="bfloat16" if args.precision == "bf16" else None),
        run=distopt.RunConfig(out_dir=args.out, log_every=args.log_every))
    result = trainer.fit(steps=args.steps)
    acc_before = heldout_accuracy(None, args.seed)
    acc_after = heldout_accuracy(result.state_dict, args.seed)
    figures = report(args, result, acc_before, acc_after, time.monotonic() - STARTED)
    write_json(args.out, "demo.json", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
