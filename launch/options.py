"""The ``distopt train`` options: one flag per Trainer argument and per config-group field.

The flags and the TOML file map one to one onto ``distopt.Trainer``: top-level keys are
its own arguments (``global_batch_size``, ``zero_stage``, ``eval_every``...), and the
tables ``[optimizer]``, ``[scaling]``, ``[failure]``, ``[checkpoint]`` and ``[run]`` hold
the fields of the update rule and of each config group, as ``--scaling.num_workers 4``
does on the command line. The group flags are made from the groups' own fields, so
their names, types and defaults are written once, in :mod:`distopt.runtime.groups`.
"""
from __future__ import annotations

import argparse
import difflib
import inspect
import re
from typing import Any

from distopt.runtime.groups import GROUPS, STRATEGIES, WIRE_DTYPES, toml_fields
from launch.inputs import UsageError

CODE_KEYS = ("model", "loss", "data", "eval_data", "eval_fn", "param_groups")  # pkg.module:attribute names
SPLITS = ("decay", "muon")  # --param_groups names: distopt.optim.decay_groups, distopt.optim.muon_groups
TABLES = ("optimizer", *GROUPS)
TRAINER_KEYS = {  # distopt.Trainer's own arguments beyond the code, the batch and the groups
    "zero_stage": "0: replicated state, 1: sharded state, 2: also sharded gradients",
    "seed": "model init and sampling seed",
    "gradient_accumulation_steps": "micro-batches per worker per step",
    "max_grad_norm": "clip the global gradient norm",
    "mixed_precision": "'bf16': forward and backward under bf16 autocast",
    "eval_every": "evaluate every N steps and at the end (0: only at the end)",
    "eval_batch_size": "samples per evaluation batch",
    "compile": "torch.compile each worker's model",
    "num_data_workers": "background loader processes per worker (0: load on the training thread)",
    "prefetch": "steps each loader process keeps ready",
}


def _number(kind: type) -> Any:
    """An argparse ``type`` that parses ``kind`` with a message naming it; ranges are checked later."""
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}") from None
    parse.__name__ = kind.__name__
    return parse


INT, FLOAT = _number(int), _number(float)


def add_trainer_options(p: argparse.ArgumentParser) -> None:
    """Top-level keys: the user's code and the Trainer's own arguments (defaults: the Trainer's)."""
    g = p.add_argument_group("your code (pkg.module:attribute, importable from the current folder)")
    g.add_argument("--model", metavar="MOD:ATTR", help="zero-arg callable returning a torch.nn.Module")
    g.add_argument("--loss", metavar="MOD:ATTR", help="(model, batch) -> loss tensor, or (loss, metrics dict)")
    g.add_argument("--data", metavar="MOD:ATTR", help="map-style dataset, or a zero-arg callable returning one")
    g.add_argument("--eval_data", metavar="MOD:ATTR", help="held-out dataset evaluated during training")
    g.add_argument("--eval_fn", metavar="MOD:ATTR", help="(model, batch) -> loss or (loss, metrics) for evaluation "
                   "(default: --loss)")
    g.add_argument("--param_groups", metavar="SPLIT", help="parameter groups: 'decay' (no weight decay on biases and "
                   "norms), 'muon' (Muon for the hidden matrices at [optimizer] muon_lr, the rule for the rest, "
                   "split as 'decay'), or MOD:ATTR, a function model -> groups (default: one group)")
    g.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file; flags override it")
    g.add_argument("--dry-run", action="store_true", help="check the options and print them as TOML; start nothing")
    t = p.add_argument_group("training (distopt.Trainer's own arguments)")
    t.add_argument("--steps", metavar="N", type=INT, default=1000, help="optimizer steps (default: 1000)")
    t.add_argument("--global_batch_size", metavar="N", type=INT, default=64, help="samples per step (default: 64)")
    kinds = {"max_grad_norm": FLOAT, "mixed_precision": str}
    for name, text in TRAINER_KEYS.items():
        default = trainer_default(name)
        shown = f"(default: {'none' if default is None else default})"
        if isinstance(default, bool):
            t.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{text} {shown}")
            continue
        t.add_argument(f"--{name}", metavar=name.split("_")[-1].upper(), type=kinds.get(name, INT),
                       default=argparse.SUPPRESS, help=f"{text} {shown}")


def trainer_default(name: str) -> Any:
    """The default of the Trainer's argument ``name``, as its signature writes it."""
    from distopt.runtime.trainer import Trainer
    return inspect.signature(Trainer).parameters[name].default


def add_optimizer_options(p: argparse.ArgumentParser) -> None:
    """``[optimizer]``: the update rule and its learning-rate schedule."""
    g = p.add_argument_group("[optimizer]")
    g.add_argument("--optimizer.name", default="adam", choices=("adam", "sgd", "muon"),
                   help="update rule (default: adam; muon takes 2-D parameters only: see --param_groups muon)")
    g.add_argument("--optimizer.muon_lr", metavar="X", type=FLOAT, default=0.02,
                   help="the Muon group's learning rate with --param_groups muon (default: 0.02)")
    g.add_argument("--optimizer.lr", metavar="X", type=FLOAT, default=1e-3,
                   help="(peak) learning rate (default: 1e-3)")
    g.add_argument("--optimizer.momentum", metavar="X", type=FLOAT, default=None,
                   help="SGD momentum (sgd only; default: 0)")
    g.add_argument("--optimizer.weight_decay", metavar="X", type=FLOAT, default=0.0,
                   help="sgd: L2 penalty; adam: decoupled decay, i.e. AdamW (default: 0)")
    g.add_argument("--optimizer.schedule", default="constant", choices=("constant", "cosine"),
                   help="lr after warmup: flat, or cosine decay to min_lr at the last step (default: constant)")
    g.add_argument("--optimizer.warmup_steps", metavar="N", type=INT, default=0,
                   help="linear lr warmup steps (default: 0)")
    g.add_argument("--optimizer.min_lr", metavar="X", type=FLOAT, default=0.0,
                   help="lr at the end of the cosine (default: 0)")


def add_group_options(p: argparse.ArgumentParser) -> None:
    """``[scaling]``, ``[failure]``, ``[checkpoint]``, ``[run]``: one flag per group field."""
    for table, cls in GROUPS.items():
        g = p.add_argument_group(f"[{table}]  (distopt.{cls.__name__})")
        helps = attribute_help(cls)
        for f in toml_fields(cls):
            shown = f.default if f.default is not None else "none"
            kw: dict[str, Any] = {"dest": f"{table}.{f.name}", "default": argparse.SUPPRESS,
                                  "help": f"{helps.get(f.name, '')} (default: {shown})"}
            if f.type in ("bool", "bool | None"):
                kw["action"] = argparse.BooleanOptionalAction
            elif f.name == "placement_strategy":
                kw["choices"] = STRATEGIES
            elif f.name == "grad_wire_dtype":
                kw["choices"] = tuple(WIRE_DTYPES)
            elif f.name == "callbacks":
                kw.update(nargs="*", metavar="NAME")
            else:
                kw.update(type={"int": INT, "float": FLOAT}.get(f.type, str), metavar=f.type.split()[0].upper())
            g.add_argument(f"--{table}.{f.name}", **kw)


def attribute_help(cls: type) -> dict[str, str]:
    """``name -> text`` from the ``Attributes:`` section of a class docstring."""
    doc = inspect.getdoc(cls) or ""
    section = doc.split("Attributes:", 1)[-1]
    out: dict[str, str] = {}
    for match in re.finditer(r"^    (\w+): (.*(?:\n        .*)*)", section, re.M):
        out[match.group(1)] = " ".join(match.group(2).split())
    return out


def group_kwargs(values: dict[str, Any], table: str) -> dict[str, Any]:
    """The options of ``[table]`` that were given (``table.name`` keys), as field -> value."""
    prefix = table + "."
    return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a TOML options file into ``dest -> value``, each value checked as its flag would be.

    Raises:
        UsageError: a missing or malformed file, an unknown key or table, or a bad value.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror}): check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config", "dry_run")}
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            if key not in TABLES:
                raise UsageError(f"--config {path}: unknown table [{key}]{_hint(key, TABLES)}: the tables are "
                                 f"{', '.join(f'[{t}]' for t in TABLES)}")
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif key in TABLES:
            raise UsageError(f"--config {path}: {key} must be a table: write [{key}] and its keys under it")
        else:
            flat[key] = value
    return {dest: _config_value(path, dest, value, actions) for dest, value in flat.items()}


def _hint(key: str, names: Any) -> str:
    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _config_value(path: str, dest: str, value: Any, actions: dict[str, argparse.Action]) -> Any:
    action = actions.get(dest)
    table, _, key = dest.rpartition(".")
    where = f"--config {path}: " + (f"[{table}] {key} = {value!r}" if table else f"{key} = {value!r}")
    if action is None:
        names = [d.rpartition(".")[2] for d in actions if d.rpartition(".")[0] == table]
        raise UsageError(f"--config {path}: unknown key {key!r}" + (f" in [{table}]" if table else "") +
                         f"{_hint(key, names)}: the keys are the flags' names, e.g. --{dest.rpartition('.')[0] or ''}"
                         f"{'.' if table else ''}{names[0] if names else key}")
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false")
        return value
    if action.nargs == "*":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{where} must be a list of strings, e.g. [\"tensorboard\"]")
        return value
    if isinstance(value, (bool, dict, list)):
        raise UsageError(f"{where} must be a single {'number' if action.type else 'string'}")
    try:
        value = action.type(str(value)) if action.type else value
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise UsageError(f"{where}: {e}") from None
    if action.type is None and not isinstance(value, str):
        raise UsageError(f"{where} must be a string: write {key} = \"{value}\"")
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where} is not one of {', '.join(map(str, action.choices))}")
    return value


def as_toml(values: dict[str, Any], groups: dict[str, Any]) -> str:
    """The run's options as a TOML document that ``--config`` reads back to the same run.

    Args:
        values: top-level and ``optimizer.*`` options (None values are left out).
        groups: table name -> config group.
    """
    import tomli_w

    doc: dict[str, Any] = {k: v for k, v in values.items() if "." not in k and v is not None}
    doc["optimizer"] = {k: v for k, v in group_kwargs(values, "optimizer").items() if v is not None}
    doc.update({table: g.to_dict() for table, g in groups.items()})
    return tomli_w.dumps(doc)
