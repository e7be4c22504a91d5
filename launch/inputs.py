"""What the ``distopt`` command reads from outside: user code (TOML files: ``options``).

``pkg.module:attribute`` names are imported with importlib, the current folder on the
path, and each failure says which module or attribute was missing and how to fix it.
Nothing here starts Ray.
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
import types
from typing import Any, Callable


class UsageError(ValueError):
    """Bad command-line or config input; the message names the fix. ``main`` exits with 2."""


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


def resolve_loss(spec: str, option: str = "--loss") -> Callable[..., Any]:
    """The loss function named by ``--loss`` (or ``--eval_fn``)."""
    obj = resolve(spec, option)
    if not callable(obj):
        raise UsageError(f"{option} {spec!r} is a {type(obj).__name__}, not a function (model, batch) -> loss")
    return obj


def resolve_data(spec: str, option: str = "--data", streams: bool = True) -> Any:
    """The dataset named by ``--data`` (or ``--eval_data``, ``streams=False``): the object
    itself, or what a zero-arg callable returns (a map-style dataset, or with ``streams``
    a torch ``IterableDataset``, ``distopt.data.shards(...)`` or a ``ray.data.Dataset``)."""
    obj = resolve(spec, option)
    if callable(obj) and not _is_dataset(obj) and not _is_stream(obj):
        try:
            obj = obj()
        except Exception as e:
            raise UsageError(f"{option} {spec!r}: calling it raised {type(e).__name__}: {e}; it must take no "
                             f"arguments and return a dataset") from e
    if streams and _is_stream(obj):
        return obj
    if not _is_dataset(obj):
        also = ", a torch IterableDataset, distopt.data.shards(...) or a ray.data.Dataset" if streams else ""
        raise UsageError(f"{option} {spec!r} gave a {type(obj).__name__}: distopt needs a map-style dataset "
                         f"(with __len__ and __getitem__), e.g. a torch.utils.data.TensorDataset{also}")
    if len(obj) == 0:
        raise UsageError(f"{option} {spec!r} is empty: it must hold samples (--data: one global batch at least)")
    return obj


def _is_stream(obj: Any) -> bool:
    from distopt.data import STREAMS, kind_of
    try:
        return kind_of(obj) in STREAMS
    except TypeError:
        return False


def _is_dataset(obj: Any) -> bool:
    return not isinstance(obj, type) and hasattr(obj, "__len__") and hasattr(obj, "__getitem__")
