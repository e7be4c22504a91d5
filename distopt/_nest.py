"""Nested-container utilities: flatten trees of dicts/lists/tuples to leaves and back.

A *tree* is a leaf (anything that is not a dict, list or tuple) or a dict, list or
tuple of trees, to any depth. Dict subclasses, list/tuple subclasses and namedtuples
are rebuilt with their own type. A tree's *structure* is plain data (``LEAF`` or a
``Node``), so the optimizer can flatten once, work on the flat list of leaves and
rebuild the caller's containers at the end.

Error messages name the offending position as a Python expression such as
``ws['layers'][2]['w']``: the tree's name, ``['key']`` per dict key, ``[i]`` per
list/tuple position.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterator, NamedTuple, Sequence

LEAF = None  # Structure of a leaf; containers are `Node`s.

Path = tuple[Any, ...]


class Node(NamedTuple):
    """Structure of one container.

    Attributes:
        build: Rebuilds the container: called with a list of children for sequences,
            or an iterable of ``(key, child)`` pairs for dicts.
        keys: The dict's keys in iteration order, or None for a list/tuple.
        children: The children's structures, in the same order as ``keys``.
    """

    build: Callable[[Any], Any]
    keys: tuple[Any, ...] | None
    children: tuple[Any, ...]


def _builder(tree: Any) -> Callable[[Any], Any]:
    if isinstance(tree, collections.defaultdict):
        # defaultdict's first positional argument is its factory, not the items.
        return functools.partial(type(tree), tree.default_factory)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)._make  # namedtuples take fields positionally
    return type(tree)


_CONTAINERS = (dict, list, tuple)


def _is_container(x: Any) -> bool:
    return isinstance(x, _CONTAINERS)


def _flatten_into(tree: Any, out: list[Any]) -> Any:
    if isinstance(tree, dict):
        keys = tuple(tree)
        children = tuple(_flatten_into(tree[k], out) for k in keys)
        return Node(_builder(tree), keys, children)
    if isinstance(tree, (list, tuple)):
        children = []
        for item in tree:
            if isinstance(item, _CONTAINERS):
                children.append(_flatten_into(item, out))
            else:  # inline the leaf case: flat lists of shards are the hot path
                out.append(item)
                children.append(LEAF)
        return Node(_builder(tree), None, tuple(children))
    out.append(tree)
    return LEAF


def flatten(tree: Any) -> tuple[list[Any], Any]:
    """Flattens a tree into its leaves, depth first, in container order.

    Args:
        tree: A leaf or a nested dict/list/tuple of leaves.

    Returns:
        ``(leaves, structure)``; ``unflatten(structure, leaves)`` rebuilds the tree.
    """
    leaves: list[Any] = []
    structure = _flatten_into(tree, leaves)
    return leaves, structure


def _build(node: Any, leaves: Iterator[Any]) -> Any:
    if node is LEAF:
        return next(leaves)
    children = [_build(child, leaves) for child in node.children]
    if node.keys is None:
        return node.build(children)
    return node.build(zip(node.keys, children))


def unflatten(structure: Any, leaves: Sequence[Any]) -> Any:
    """Rebuilds a tree of the given structure from a flat list of leaves.

    Args:
        structure: The structure returned by `flatten`.
        leaves: One leaf per leaf of the structure, in `flatten` order.

    Returns:
        A new tree with the same container types as the flattened one.
    """
    return _build(structure, iter(leaves))


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Applies ``fn`` to every leaf and returns a tree of the same structure."""
    leaves, structure = flatten(tree)
    return unflatten(structure, [fn(leaf) for leaf in leaves])


def path_str(root: str, path: Path) -> str:
    """Formats a path as a Python expression, e.g. ``ws['layers'][2]['w']``."""
    return root + "".join(f"[{key!r}]" for key in path)


def leaf_paths(structure: Any, prefix: Path = ()) -> list[Path]:
    """Lists the path of every leaf, in `flatten` order (used for error messages)."""
    if structure is LEAF:
        return [prefix]
    keys = structure.keys if structure.keys is not None else range(len(structure.children))
    paths: list[Path] = []
    for key, child in zip(keys, structure.children):
        paths.extend(leaf_paths(child, prefix + (key,)))
    return paths


def _kind(x: Any) -> str:
    if isinstance(x, dict):
        return "a dict"
    return "a list/tuple" if isinstance(x, (list, tuple)) else "an array leaf"


def _collect_like(tree: Any, node: Any, path: Path, out: list[Any], names: tuple[str, str]) -> None:
    if node is LEAF and not _is_container(tree):
        out.append(tree)
        return
    here, there = path_str(names[0], path), path_str(names[1], path)
    wants_dict = node is not LEAF and node.keys is not None
    if node is LEAF or not _is_container(tree) or isinstance(tree, dict) != wants_dict:
        expected = "an array leaf" if node is LEAF else ("a dict" if wants_dict else "a list/tuple")
        raise ValueError(f"{here} is {_kind(tree)} but {there} is {expected}: give both the same nesting")
    if wants_dict:
        for key, child in zip(node.keys, node.children):
            if key not in tree:
                raise ValueError(f"{here} is missing key {key!r} that {there} has")
            _collect_like(tree[key], child, path + (key,), out, names)
        if len(tree) != len(node.keys):
            known = set(node.keys)
            extra = next(k for k in tree if k not in known)
            raise ValueError(f"{here} has key {extra!r} that {there} lacks")
        return
    if len(tree) != len(node.children):
        raise ValueError(f"{here} has {len(tree)} items but {there} has {len(node.children)}")
    for i, (item, child) in enumerate(zip(tree, node.children)):
        if child is LEAF and not isinstance(item, _CONTAINERS):
            out.append(item)  # inline the leaf case, as in _flatten_into
        else:
            _collect_like(item, child, path + (i,), out, names)


def flatten_like(tree: Any, structure: Any, name: str, ref_name: str) -> list[Any]:
    """Flattens ``tree`` in the leaf order of another tree's structure.

    Dict keys are looked up by name, so key order may differ; a list may stand in
    for a tuple and vice versa.

    Args:
        tree: The tree to flatten.
        structure: The reference structure, from `flatten`.
        name: The name of ``tree`` in error messages, e.g. ``"dcdws"``.
        ref_name: The name of the reference tree, e.g. ``"ws"``.

    Returns:
        The leaves of ``tree``, aligned with the reference tree's leaves.

    Raises:
        ValueError: The nesting differs; the message names the first differing path.
    """
    leaves: list[Any] = []
    _collect_like(tree, structure, (), leaves, (name, ref_name))
    return leaves


def _check_shapes(leaves: list[Any], ref_leaves: list[Any], structure: Any, names: tuple[str, str]) -> None:
    for i, (leaf, ref) in enumerate(zip(leaves, ref_leaves)):
        shape, ref_shape = getattr(leaf, "shape", None), getattr(ref, "shape", None)
        # torch.Size is a tuple, so shapes compare equal across frameworks; leaves
        # without a shape are left for the caller's type check to report.
        if shape != ref_shape and shape is not None and ref_shape is not None:
            path = leaf_paths(structure)[i]
            raise ValueError(
                f"shape mismatch at {path_str(names[0], path)}: {tuple(shape)} vs "
                f"{path_str(names[1], path)} {tuple(ref_shape)}"
            )


def flatten_aligned(named_trees: Sequence[tuple[str, Any]]) -> tuple[list[list[Any]], Any]:
    """Flattens several trees that must share structure and leaf shapes.

    Args:
        named_trees: ``(name, tree)`` pairs; the first tree is the reference.

    Returns:
        ``(leaf_lists, structure)``: one aligned leaf list per tree, and the first
        tree's structure.

    Raises:
        ValueError: A tree's nesting or a leaf's shape differs from the first tree's;
            the message names both paths.
    """
    (ref_name, ref_tree), others = named_trees[0], named_trees[1:]
    ref_leaves, structure = flatten(ref_tree)
    leaf_lists = [ref_leaves]
    for name, tree in others:
        leaves = flatten_like(tree, structure, name, ref_name)
        _check_shapes(leaves, ref_leaves, structure, (name, ref_name))
        leaf_lists.append(leaves)
    return leaf_lists, structure
