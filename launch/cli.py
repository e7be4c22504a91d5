"""The ``distopt`` command: ``distopt train`` runs user training code on a Ray cluster.

The user's model, loss and data are named as ``pkg.module:attribute`` and imported here
(the current folder is on the import path). Options come from the command line, or from
a TOML file (``--config``) that maps one to one onto ``distopt.Trainer``: top-level keys
are its own arguments, the tables ``[scaling]``, ``[failure]``, ``[checkpoint]`` and
``[run]`` its config groups, ``[optimizer]`` the update rule (:mod:`launch.options`); a
flag given on the command line overrides the file. Everything is checked before Ray
starts: :func:`build_trainer_kwargs` turns the parsed options into ``distopt.Trainer``
arguments without touching Ray, and :func:`main` is the only part that starts a run.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Sequence

from distopt.runtime.groups import GROUPS
from launch.inputs import UsageError, resolve_data, resolve_loss, resolve_model
from launch.options import (SPLITS, TRAINER_KEYS, add_group_options, add_optimizer_options, add_trainer_options,
                            as_toml, group_kwargs, load_config, trainer_default)

PROG = "distopt train"
EXAMPLES = """\
examples:
  distopt train --model mytask:make_model --loss mytask:loss --data mytask:dataset \\
      --scaling.num_workers 2 --steps 1000 --optimizer.lr 3e-4 --run.out_dir runs/first

  # long runs: keep the options in a TOML file; command-line flags override it
  distopt train --config run.toml --steps 20000
  distopt train --config run.toml --dry-run > full.toml   # every option, defaults included

  # run.toml: top-level keys are the Trainer's arguments, tables its config groups
  model = "mytask:make_model"
  loss = "mytask:loss"
  data = "mytask:dataset"
  eval_data = "mytask:heldout"
  eval_every = 200
  global_batch_size = 256
  zero_stage = 2
  [optimizer]
  name = "adam"
  lr = 3e-4
  schedule = "cosine"
  warmup_steps = 500
  [scaling]
  num_workers = 8
  use_gpu = true
  [checkpoint]
  dir = "/shared/ckpt"
  every = 1000
  [run]
  out_dir = "runs/big"
  callbacks = ["tensorboard"]

  # on a running cluster (launch/README.md): ship this folder so workers import mytask
  ray job submit --working-dir . -- distopt train --config run.toml --scaling.ray_address auto
"""


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
                    "--model, --loss and --data are required, on the command line or in --config.\n"
                    "Each flag is a key of the --config file: --scaling.num_workers is num_workers in [scaling].")
    add_trainer_options(train)
    add_optimizer_options(train)
    add_group_options(train)
    return top, train


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
    """The update rule (with its lr schedule) that ``[optimizer]`` describes; no user code runs.

    Raises:
        UsageError: options that do not fit together, e.g. momentum with adam.
    """
    from distopt.optim import adam, muon, sgd
    from distopt.optim.schedules import make_schedule

    o = group_kwargs(vars(args), "optimizer")
    try:
        lr = make_schedule(o["schedule"], o["lr"], args.steps, o["warmup_steps"], o["min_lr"])
    except ValueError as e:
        raise UsageError(f"lr schedule: {e}") from None
    if o["schedule"] == "constant" and not o["warmup_steps"]:
        lr = o["lr"]  # a plain number where nothing varies: simpler to log and to read back
    if o["name"] == "adam":
        if o["momentum"] is not None:
            raise UsageError("[optimizer] momentum applies to name = \"sgd\"; Adam's moments need no setting: "
                             "drop --optimizer.momentum")
        return adam(lr=lr, weight_decay=o["weight_decay"], decoupled=bool(o["weight_decay"]))
    if o["name"] == "muon":
        return muon(lr=lr, weight_decay=o["weight_decay"], momentum=0.95 if o["momentum"] is None else o["momentum"])
    return sgd(lr=lr, momentum=o["momentum"] or 0.0, weight_decay=o["weight_decay"])


def build_param_groups(args: argparse.Namespace) -> Any:
    """The ``param_groups`` function ``--param_groups`` names (None: one group).

    Raises:
        UsageError: a name that is neither a split nor importable code.
    """
    import functools

    from distopt.optim import decay_groups, muon, muon_groups
    spec = args.param_groups
    if not spec:
        return None
    if spec == "decay":
        return decay_groups
    if spec == "muon":
        return functools.partial(muon_groups, rule=muon(lr=group_kwargs(vars(args), "optimizer")["muon_lr"]))
    if ":" not in spec:
        raise UsageError(f"--param_groups {spec!r}: use one of {', '.join(SPLITS)}, or MOD:ATTR naming a function "
                         f"model -> groups")
    return resolve_loss(spec, "--param_groups")


def build_groups(args: argparse.Namespace) -> dict[str, Any]:
    """The config groups the options describe (fields not given keep the groups' defaults).

    Raises:
        UsageError: a field the group refuses; the message names the flag and the TOML key.
    """
    groups = {}
    for table, cls in GROUPS.items():
        try:
            groups[table] = cls(**group_kwargs(vars(args), table))
        except (TypeError, ValueError) as e:
            raise UsageError(f"{e} (--{table}.<field>, or the key under [{table}] in --config)") from None
    return groups


def build_trainer_kwargs(args: argparse.Namespace) -> dict:
    """``distopt.Trainer`` keyword arguments from parsed options; imports user code, not Ray.

    Raises:
        UsageError: bad options or user code that cannot be found; the message names the fix.
    """
    values = vars(args)
    kwargs = {"model": resolve_model(args.model), "loss": resolve_loss(args.loss), "data": resolve_data(args.data),
              "optimizer": build_optimizer(args), "global_batch_size": args.global_batch_size}
    if args.eval_data:
        kwargs["eval_data"] = resolve_data(args.eval_data, "--eval_data", streams=False)
    if args.eval_fn:
        kwargs["eval_fn"] = resolve_loss(args.eval_fn, "--eval_fn")
    if args.param_groups:
        kwargs["param_groups"] = build_param_groups(args)
    kwargs.update({name: values[name] for name in TRAINER_KEYS if name in values})
    return {**kwargs, **build_groups(args)}


def describe(args: argparse.Namespace, kwargs: dict) -> str:
    """The run's options as TOML, defaults included, for --dry-run: ``--config`` reads it back."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "dry_run")}
    defaults = {name: trainer_default(name) for name in TRAINER_KEYS}  # the Trainer's, written there
    data = kwargs["data"]
    size = f"{len(data)} samples" if hasattr(data, "__len__") and hasattr(data, "__getitem__") else "a stream"
    header = f"# {PROG}: {args.steps} steps, {size}\n"
    values.update({k: v for k, v in defaults.items() if k not in values})
    return header + as_toml(values, {t: kwargs[t] for t in GROUPS})


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
        print(describe(args, kwargs))
        return 0
    import distopt

    try:
        trainer = distopt.Trainer(**kwargs)
    except (ValueError, TypeError, ImportError) as e:  # the Trainer's own checks, before any work starts
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    result = trainer.fit(steps=args.steps)
    _finish(result, kwargs["run"].out_dir)
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
    if summary.get("eval_loss") is not None:
        print(f"held-out loss {summary['eval_loss']:.4f}")
    print(f"recovered failures {len(result.failures)}")
    if out:
        from distopt.checkpoint import export_safetensors

        os.makedirs(out, exist_ok=True)
        # safetensors: loads anywhere (safetensors, transformers) and never runs code.
        export_safetensors(result.state_dict, os.path.join(out, "model.safetensors"))
        print(f"output {os.path.abspath(out)}")


if __name__ == "__main__":
    sys.exit(main())
