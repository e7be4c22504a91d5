"""What ``Trainer(data=...)`` accepts, told apart on the driver and built on each worker.

Kinds: ``"map"`` (``__len__`` and ``__getitem__``), ``"iterable"`` (a torch
``IterableDataset``), ``"shards"`` (:func:`distopt.data.shards`), ``"ray"`` (a
``ray.data.Dataset``, recognised by its type without importing Ray) and ``"factory"`` (a
zero-argument module-level function or class returning one of the others, called on each
worker so the dataset itself is never pickled).
"""
from __future__ import annotations

from typing import Any

from torch.utils.data import IterableDataset

from distopt.data.shards import Shards

KINDS = ("map", "iterable", "shards", "ray", "factory")
STREAMS = ("iterable", "shards", "ray")  # read from a committed position, not indexed by step


def is_ray_dataset(data: Any) -> bool:
    """Whether ``data`` is a ``ray.data.Dataset`` (Ray is not imported to tell)."""
    return any(c.__module__.startswith("ray.data") and c.__name__ == "Dataset" for c in type(data).__mro__)


def kind_of(data: Any) -> str:
    """The kind of ``data`` (one of :data:`KINDS`).

    Raises:
        TypeError: ``data`` is none of them (naming what each needs).
    """
    if isinstance(data, type):  # a class is a factory: its attributes would look like a dataset's
        _check_factory(data)
        return "factory"
    if isinstance(data, Shards):
        return "shards"
    if isinstance(data, IterableDataset):
        return "iterable"
    if is_ray_dataset(data):
        return "ray"
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return "map"
    if callable(data):
        _check_factory(data)
        return "factory"
    raise TypeError(f"data must be a map-style dataset (__len__ and __getitem__), a torch IterableDataset, "
                    f"distopt.data.shards(paths, read), a ray.data.Dataset, or a zero-argument module-level "
                    f"function returning one of them; got {type(data).__name__}")


def _check_factory(fn: Any) -> None:
    qualname = getattr(fn, "__qualname__", "")
    if not getattr(fn, "__module__", None) or "<" in qualname:
        raise TypeError(f"data={qualname or type(fn).__name__} is a function but not a module-level one (a lambda "
                        f"or a nested function would be pickled with everything it captures): define the factory "
                        f"at the top level of a module the workers can import")


def build(data: Any) -> tuple[Any, str]:
    """The dataset a worker reads, and its kind: ``data`` itself, or what its factory returns.

    Raises:
        TypeError: the factory returned something that is not a dataset.
    """
    kind = kind_of(data)
    if kind != "factory":
        return data, kind
    made = data()
    try:
        made_kind = kind_of(made)
    except TypeError as e:
        raise TypeError(f"data factory {data.__qualname__}() returned {type(made).__name__}: {e}") from None
    if made_kind == "factory":
        raise TypeError(f"data factory {data.__qualname__}() returned a callable, not a dataset: return the "
                        f"dataset itself")
    return made, made_kind
