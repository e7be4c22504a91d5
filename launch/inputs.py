"""What the ``distopt`` command reads from outside: TOML option files and user code.

``pkg.module:attribute`` names are imported with importlib, the current folder on the
path, and each failure says which module or attribute was missing and how to fix it.
Nothing here starts Ray.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import types
from typing import Any, Callable


class UsageError(ValueError):
    """Bad command-line or config input; the message names the fix. ``main`` exits with 2."""


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a TOML options file and check each value as its command-line flag would be.

    Raises:
        UsageError: a missing or malformed file, an unknown key, or a bad value.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UsageError("--config needs Python 3.11+ (tomllib) or the tomli package: pip install tomli") from None
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror}): check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    return {key.replace("-", "_"): _config_value(path, key, value, actions) for key, value in raw.items()}


def _config_value(path: str, key: str, value: Any, actions: dict[str, argparse.Action]) -> Any:
    action = actions.get(key.replace("-", "_"))
    if action is None:
        close = difflib.get_close_matches(key.replace("-", "_"), list(actions), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"--config {path}: unknown key {key!r}{hint}: keys are the long option names "
                         f"with underscores, e.g. batch_size = 64")
    where = f"--config {path}: {key} = {value!r}"
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false")
        return value
    if isinstance(value, (bool, dict, list)):
        raise UsageError(f"{where} must be a single {'number' if action.type else 'string'}, as after {key}")
    try:
        value = action.type(str(value)) if action.type else value
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise UsageError(f"{where}: {e}") from None
    if action.type is None and not isinstance(value, str):
        raise UsageError(f"{where} must be a string: write {key} = \"{value}\"")
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where} is not one of {', '.join(map(str, action.choices))}")
    return value


def resolve(spec: str, option: str) -> Any:
    """Import ``pkg.module:attr`` (attr may be dotted), the current folder on the path.

    Raises:
        UsageError: a malformed spec, a module that is missing or fails to import, a missing attribute.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{option} {spec!r} is not of the form pkg.module:attribute, e.g. {option} mytask:make_model")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does: the user's own files come first
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UsageError(f"{option} {spec!r}: no module named {e.name!r} in {cwd} or on sys.path: run distopt "
                             f"from the folder that holds it, or pip install it") from None
        raise UsageError(f"{option} {spec!r}: importing {module_name!r} failed, it needs the missing module "
                         f"{e.name!r}: pip install it") from None
    except Exception as e:  # any error while the user's module runs: show it, with where it came from
        raise UsageError(f"{option} {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = _public_names(obj)
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"{option} {spec!r}: {module_name!r} has no attribute {attr!r}: {hint}"
                             f"it defines {', '.join(names[:15]) or 'nothing public'}")
        obj = getattr(obj, part)
    return obj


def _public_names(obj: Any) -> list[str]:
    """What a module offers, without the modules and ``__future__`` flags it imported."""
    values = {n: getattr(obj, n) for n in dir(obj) if not n.startswith("_")}
    return [n for n, v in values.items()
            if not isinstance(v, types.ModuleType) and type(v).__module__ != "__future__"]


def resolve_model(spec: str) -> Callable[[], Any]:
    """The model factory named by ``--model``: a zero-arg callable, not a built model."""
    import torch

    obj = resolve(spec, "--model")
    if isinstance(obj, torch.nn.Module):
        raise UsageError(f"--model {spec!r} is a built {type(obj).__name__}; name a function that builds it, "
                         f"e.g. def make_model(): return {type(obj).__name__}(...)")
    if not callable(obj):
        raise UsageError(f"--model {spec!r} is a {type(obj).__name__}, not a callable: name a model-building function")
    return obj


def resolve_loss(spec: str) -> Callable[..., Any]:
    """The loss function named by ``--loss``."""
    obj = resolve(spec, "--loss")
    if not callable(obj):
        raise UsageError(f"--loss {spec!r} is a {type(obj).__name__}, not a function (model, batch) -> loss")
    return obj


def resolve_data(spec: str) -> Any:
    """The dataset named by ``--data``: the object itself, or what a zero-arg callable returns."""
    obj = resolve(spec, "--data")
    if callable(obj) and not _is_dataset(obj):
        try:
            obj = obj()
        except Exception as e:
            raise UsageError(f"--data {spec!r}: calling it raised {type(e).__name__}: {e}; it must take no "
                             f"arguments and return a dataset") from e
    if not _is_dataset(obj):
        raise UsageError(f"--data {spec!r} gave a {type(obj).__name__}: distopt needs a map-style dataset "
                         f"(with __len__ and __getitem__), e.g. a torch.utils.data.TensorDataset")
    if len(obj) == 0:
        raise UsageError(f"--data {spec!r} is empty: it must hold at least --batch-size samples")
    return obj


def _is_dataset(obj: Any) -> bool:
    return not isinstance(obj, type) and hasattr(obj, "__len__") and hasattr(obj, "__getitem__")
