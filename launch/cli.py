"""The ``distopt`` command: ``distopt train`` runs user training code on a Ray cluster.

The user's model, loss and data are named as ``pkg.module:attribute`` and imported here
(the current folder is on the import path). Options come from the command line, or from
a TOML file (``--config``) whose keys are the long option names with underscores; a flag
given on the command line overrides the file. Everything is checked before Ray starts:
:func:`build_trainer_kwargs` turns the parsed options into ``distopt.Trainer`` arguments
without touching Ray, and :func:`main` is the only part that starts a run.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Callable, Sequence

from launch.inputs import UsageError, load_config, resolve_data, resolve_loss, resolve_model

PROG = "distopt train"
EXAMPLES = """\
examples:
  distopt train --model mytask:make_model --loss mytask:loss --data mytask:dataset \\
      --workers 2 --steps 1000 --lr 3e-4 --out runs/first

  # long runs: keep the options in a TOML file; command-line flags override it
  distopt train --config run.toml --steps 20000

  # run.toml (keys are the long option names with underscores)
  model = "mytask:make_model"
  loss = "mytask:loss"
  data = "mytask:dataset"
  workers = 8
  gpus_per_worker = 1
  zero_stage = 2
  schedule = "cosine"
  warmup_steps = 500

  # on a running cluster (launch/README.md): ship this folder so workers import mytask
  ray job submit --working-dir . -- distopt train --address auto --config run.toml
"""


def _number(kind: type, minimum: float, strict: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: parse ``kind`` and require ``>= minimum`` (``>`` when strict)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {minimum:g}")
        return value
    parse.__name__ = kind.__name__
    return parse


COUNT, NONNEG_INT = _number(int, 1), _number(int, 0)
NONNEG, POSITIVE = _number(float, 0.0), _number(float, 0.0, strict=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``distopt`` parser, with the ``train`` subcommand."""
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    top = argparse.ArgumentParser(prog="distopt", description="Data-parallel training with sharded optimizer "
                                  "state on Ray. Run 'distopt train --help' for the options.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train a model data-parallel on a Ray cluster", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model data-parallel on a Ray cluster, with ZeRO-sharded optimizer state.\n"
                    "--model, --loss and --data are required, on the command line or in --config.")
    _add_code_and_config(train)
    _add_cluster(train)
    _add_training(train)
    _add_optimizer(train)
    _add_output(train)
    return top, train


def _add_code_and_config(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your code (pkg.module:attribute, importable from the current folder)")
    g.add_argument("--model", metavar="MOD:ATTR", help="zero-arg callable returning a torch.nn.Module")
    g.add_argument("--loss", metavar="MOD:ATTR", help="(model, batch) -> loss tensor, or (loss, metrics dict)")
    g.add_argument("--data", metavar="MOD:ATTR", help="map-style dataset, or a zero-arg callable returning one")
    g.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file; flags override it")
    g.add_argument("--dry-run", action="store_true", help="check and print the run's settings, start nothing")


def _add_cluster(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", metavar="N", type=COUNT, default=2, help="data-parallel workers (default: 2)")
    g.add_argument("--gpus-per-worker", metavar="{0,1}", type=NONNEG_INT, default=0,
                   help="0 (CPU) or 1 (default: 0)")
    g.add_argument("--cpus-per-worker", metavar="N", type=POSITIVE, default=1.0,
                   help="CPUs reserved per worker (default: 1)")
    g.add_argument("--address", metavar="ADDR", default=None,
                   help="Ray cluster to join: 'auto', HOST:PORT or ray://HOST:PORT; 'local' runs in this "
                        "process without Ray (default: start a Ray cluster for this run)")
    g.add_argument("--placement", default="PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                   help="how workers are placed on nodes (default: PACK)")
    g.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="folder for checkpoints (step-N subfolders), shared by all nodes")
    g.add_argument("--checkpoint-every", metavar="N", type=NONNEG_INT, default=0,
                   help="also checkpoint every N steps, in the background (default: only at the end)")
    g.add_argument("--keep-last", metavar="N", type=COUNT, default=3,
                   help="complete checkpoints to keep (default: 3)")
    g.add_argument("--resume", metavar="DIR", default=None,
                   help="resume from a checkpoint folder, or the newest good one under a checkpoint root")
    g.add_argument("--max-failures", metavar="N", type=NONNEG_INT, default=3,
                   help="failures to recover from (default: 3)")
    g.add_argument("--spare-workers", metavar="N", type=NONNEG_INT, default=0,
                   help="idle workers with the model built, ready to take a lost rank (default: 0)")
    g.add_argument("--min-workers", metavar="N", type=COUNT, default=1,
                   help="fewest workers a run may shrink to when no replacement fits (default: 1)")
    g.add_argument("--no-grow-back", dest="grow_back", action="store_false",
                   help="after a shrink, stay small even when the lost resources return")


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", metavar="N", type=COUNT, default=1000, help="optimizer steps (default: 1000)")
    g.add_argument("--batch-size", metavar="N", type=COUNT, default=64,
                   help="global batch size per step (default: 64)")
    g.add_argument("--grad-accum", metavar="N", type=COUNT, default=1,
                   help="gradient accumulation steps (default: 1)")
    g.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2),
                   help="0: replicated state, 1: sharded state, 2: also sharded gradients (default: 1)")
    g.add_argument("--max-grad-norm", metavar="X", type=POSITIVE, default=None,
                   help="clip the global gradient norm (default: off)")
    g.add_argument("--seed", metavar="N", type=NONNEG_INT, default=0,
                   help="model init and sampling seed (default: 0)")


def _add_optimizer(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="update rule (default: adam)")
    g.add_argument("--lr", metavar="X", type=NONNEG, default=1e-3, help="(peak) learning rate (default: 1e-3)")
    g.add_argument("--momentum", metavar="X", type=NONNEG, default=None,
                   help="SGD momentum (sgd only; default: 0)")
    g.add_argument("--weight-decay", metavar="X", type=NONNEG, default=0.0,
                   help="sgd: L2 penalty; adam: decoupled decay, i.e. AdamW (default: 0)")
    g.add_argument("--schedule", default="constant", choices=("constant", "cosine"),
                   help="lr after warmup: flat, or cosine decay to --min-lr at the last step (default: constant)")
    g.add_argument("--warmup-steps", metavar="N", type=NONNEG_INT, default=0,
                   help="linear lr warmup steps (default: 0)")
    g.add_argument("--min-lr", metavar="X", type=NONNEG, default=0.0,
                   help="lr at the end of the cosine (default: 0)")


def _add_output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="folder for metrics.jsonl, loss.png, summary.json, model.safetensors (default: none)")
    g.add_argument("--log-every", metavar="N", type=NONNEG_INT, default=10,
                   help="log a line every N steps when there is no bar; 0: quiet (default: 10)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only when stderr is a terminal)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line, merge ``--config`` under it, check required options.

    Raises:
        SystemExit: status 2 with a message naming the fix, on any bad input.
    """
    top, train = _parsers()
    args = top.parse_args(argv)
    if args.config:
        try:
            train.set_defaults(**load_config(args.config, train))
        except UsageError as e:
            train.error(str(e))
        args = top.parse_args(argv)  # again: flags given on the command line beat the file
    missing = [f"--{name}" for name in ("model", "loss", "data") if not getattr(args, name)]
    if missing:
        train.error(f"missing {', '.join(missing)}: pass e.g. --model mytask:make_model, or set "
                    f"{missing[0][2:]} = \"mytask:...\" in the --config file")
    return args


def build_optimizer(args: argparse.Namespace) -> Any:
    """The update rule (with its lr schedule) that the options describe; no user code runs.

    Raises:
        UsageError: options that do not fit together, e.g. --momentum with adam.
    """
    from distopt.optim import adam, sgd
    from distopt.optim.schedules import make_schedule

    try:
        lr = make_schedule(args.schedule, args.lr, args.steps, args.warmup_steps, args.min_lr)
    except ValueError as e:
        raise UsageError(f"lr schedule: {e}") from None
    if args.schedule == "constant" and not args.warmup_steps:
        lr = args.lr  # a plain number where nothing varies: simpler to log and to read back
    if args.optimizer == "adam":
        if args.momentum is not None:
            raise UsageError("--momentum applies to --optimizer sgd; Adam's moments need no setting: drop --momentum")
        return adam(lr=lr, weight_decay=args.weight_decay, decoupled=bool(args.weight_decay))
    return sgd(lr=lr, momentum=args.momentum or 0.0, weight_decay=args.weight_decay)


def build_trainer_kwargs(args: argparse.Namespace) -> dict:
    """``distopt.Trainer`` keyword arguments from parsed options; imports user code, not Ray.

    Raises:
        UsageError: bad options or user code that cannot be found; the message names the fix.
    """
    if args.gpus_per_worker > 1:
        raise UsageError(f"--gpus-per-worker {args.gpus_per_worker}: distopt runs one worker per GPU: "
                         f"use --gpus-per-worker 1 and --workers {args.workers * args.gpus_per_worker}")
    optimizer = build_optimizer(args)
    return {"model": resolve_model(args.model), "loss": resolve_loss(args.loss), "data": resolve_data(args.data),
            "optimizer": optimizer, "global_batch_size": args.batch_size, "num_workers": args.workers,
            "use_gpu": args.gpus_per_worker == 1, "zero_stage": args.zero_stage, "seed": args.seed,
            "gradient_accumulation_steps": args.grad_accum, "max_grad_norm": args.max_grad_norm,
            "log_every": args.log_every, "out_dir": args.out, "progress": args.progress,
            "ray_address": args.address, "num_cpus_per_worker": args.cpus_per_worker,
            "placement_strategy": args.placement, "checkpoint_dir": args.checkpoint_dir,
            "checkpoint_every": args.checkpoint_every, "keep_last": args.keep_last, "resume_from": args.resume,
            "max_failures": args.max_failures, "spare_workers": args.spare_workers, "min_workers": args.min_workers,
            "grow_back": args.grow_back}


def describe(kwargs: dict, steps: int) -> str:
    """The run's settings as text, for --dry-run."""
    lines = [f"{PROG}: {steps} steps, {len(kwargs['data'])} samples"]
    for key, value in kwargs.items():
        shown = {**value.config(), "lr": value.lr} if key == "optimizer" else getattr(value, "__qualname__", value)
        lines.append(f"  {key:<28} {type(value).__name__ if key == 'data' else shown}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``distopt`` console script; returns the exit status."""
    args = parse_args(argv)
    try:
        kwargs = build_trainer_kwargs(args)
    except UsageError as e:
        if e.__cause__ is not None:  # the user's own code raised: where it did matters more than our words
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(kwargs, args.steps))
        return 0
    import distopt

    try:
        trainer = distopt.Trainer(**kwargs)
    except (ValueError, TypeError) as e:  # the Trainer's own checks, before any work starts
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    result = trainer.fit(steps=args.steps)
    _finish(result, args.out)
    return 0


def _finish(result: Any, out: str | None) -> None:
    """Print the run's summary and keep the final weights in ``out/model.safetensors``."""
    summary, history = dict(result.summary or {}), result.history
    if history:
        print(f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} over {len(history)} steps")
    if summary.get("steps_per_s"):
        print(f"speed {summary['steps_per_s']:.1f} steps/s, {summary.get('samples_per_s') or 0:,.0f} samples/s")
    if summary.get("state_bytes_per_worker") is not None:
        print(f"optimizer state {summary['state_bytes_per_worker']:,} B per worker, "
              f"{summary.get('state_bytes_unsharded', 0):,} B unsharded")
    print(f"recovered failures {len(result.failures)}")
    if out:
        from distopt.checkpoint import export_safetensors

        os.makedirs(out, exist_ok=True)
        # safetensors: loads anywhere (safetensors, transformers) and never runs code.
        export_safetensors(result.state_dict, os.path.join(out, "model.safetensors"))
        print(f"output {os.path.abspath(out)}")


if __name__ == "__main__":
    sys.exit(main())
