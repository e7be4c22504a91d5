"""The ``make run`` main job: a small GPT learns Python from the standard library's own source.

Two workers on a local Ray cluster train the byte-level GPT of :mod:`launch.gpt`
data-parallel, ZeRO stage 1 (each keeps half of Adam's state), fault tolerance on. The
held-out files' loss is measured on the driver before and after, from the initial and
the returned weights; the run ends with a sample of generated text.

    python launch/run_gpt.py                 # ~2 min on 2 CPU cores; writes runs/gpt/
    python launch/run_gpt.py --steps 1000 --embd 128 --out runs/gpt-big
"""
from __future__ import annotations

import argparse
import os
import sys
import time

STARTED = time.monotonic()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from anywhere; the Trainer passes sys.path on to the workers

import torch  # noqa: E402  (after the path set-up above)

import distopt  # noqa: E402
from distopt.checkpoint import export_safetensors  # noqa: E402
from launch import gpt  # noqa: E402
from launch.report import state_bytes_line, write_json  # noqa: E402

PROMPT = "def "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's options; the defaults are what ``make run`` runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "gpt"), help="output folder")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--workers", type=int, default=2, help="Ray workers, one CPU each")
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2), help="ZeRO stage")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size, in windows of --block bytes")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine)")
    p.add_argument("--warmup", type=int, default=20, help="warmup steps")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--embd", type=int, default=64, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--block", type=int, default=64, help="context length in bytes")
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this much text (default: all)")
    p.add_argument("--eval-windows", type=int, default=256, help="held-out windows in the before/after loss")
    p.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps during training")
    p.add_argument("--sample-bytes", type=int, default=200, help="bytes of generated text shown at the end")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the sampling")
    p.add_argument("--log-every", type=int, default=25, help="log period without a terminal")
    p.add_argument("--compile", action="store_true", help="torch.compile each worker's model")
    return p.parse_args(argv)


def initial_model(config: gpt.GPTConfig, seed: int) -> gpt.GPT:
    """The model every worker starts from: built after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return gpt.GPT(config)


def report(args: argparse.Namespace, result, before: float, after: float, sample: str, fit_s: float) -> dict:
    """Print the run's summary and return it as plain data (also written to gpt.json)."""
    summary = dict(result.summary or {})
    history = result.history
    num_params = sum(t.numel() for t in result.state_dict.values())
    steps_s = sum(e["time_s"] for e in history)
    steps_per_s = len(history) / steps_s
    tokens_per_s = steps_per_s * args.batch_size * args.block
    lines = [
        "",
        f"gpt: {len(history)} steps, {args.workers} workers, ZeRO-{args.zero_stage}, {num_params:,} parameters, "
        f"batch {args.batch_size} x {args.block} bytes",
        f"held-out loss     {before:.3f} -> {after:.3f} nats/byte ({args.eval_windows} windows of unseen files)",
        f"train loss        {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}",
        f"speed             {tokens_per_s:,.0f} tokens/s ({steps_per_s:.2f} steps/s)",
        state_bytes_line(summary, num_params, args.workers, args.zero_stage),
        f"recovered failures {len(result.failures)}",
        f"time              {steps_s:.1f} s in steps, {fit_s:.1f} s in fit (workers' start included), "
        f"{time.monotonic() - STARTED:.1f} s in all (imports, data, Ray)",
        f"output            {os.path.abspath(args.out)}",
        f"sample            {sample!r}",
    ]
    print("\n".join(lines), flush=True)
    return {"steps": len(history), "heldout_loss_before": before, "heldout_loss_after": after,
            "train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"],
            "tokens_per_s": tokens_per_s, "num_params": num_params, "steps_s": steps_s, "fit_s": fit_s,
            "state_bytes_per_worker": summary.get("state_bytes_per_worker"),
            "state_bytes_unsharded": summary.get("state_bytes_unsharded"), "sample": sample}


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate on the driver, print the summary; returns the exit status."""
    args = parse_args(argv)
    config = gpt.GPTConfig(block_size=args.block, n_layer=args.layers, n_head=args.heads, n_embd=args.embd)
    train, held_out = gpt.datasets(args.block, args.max_bytes)
    print(f"data: {len(train) * args.block:,} training bytes, {len(held_out) * args.block:,} held-out bytes "
          f"from {gpt.stdlib_files()[0].parent}", flush=True)
    before = gpt.evaluate(initial_model(config, args.seed), held_out, args.eval_windows)
    schedule = distopt.optim.warmup_cosine(args.lr, args.steps, args.warmup, args.lr / 10)
    trainer = distopt.Trainer(
        model=gpt.ModelFactory(config), loss=gpt.loss, data=train,
        optimizer=distopt.optim.adam(lr=schedule, weight_decay=0.1, decoupled=True),  # AdamW
        param_groups=distopt.optim.decay_groups,  # no decay on biases and norms
        global_batch_size=args.batch_size, zero_stage=args.zero_stage, seed=args.seed,
        eval_data=gpt.eval_windows(held_out, args.eval_windows), eval_every=args.eval_every, compile=args.compile,
        scaling=distopt.ScalingConfig(num_workers=args.workers),
        run=distopt.RunConfig(out_dir=args.out, log_every=args.log_every))
    fit_started = time.monotonic()
    result = trainer.fit(steps=args.steps)
    fit_s = time.monotonic() - fit_started
    model = gpt.GPT(config)
    model.load_state_dict(result.state_dict)
    after = gpt.evaluate(model, held_out, args.eval_windows)
    sample = gpt.generate(model, PROMPT, args.sample_bytes, seed=args.seed)
    figures = report(args, result, before, after, sample, fit_s)
    write_json(args.out, "gpt.json", figures)
    export_safetensors(result.state_dict, os.path.join(args.out, "model.safetensors"),
                       metadata={"config": repr(config), "steps": str(len(result.history))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
