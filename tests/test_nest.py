"""Tests for distopt._nest: flatten/unflatten round trips and path-naming errors."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from distopt import _nest

Pair = collections.namedtuple("Pair", "first second")


class Tup(tuple):
    pass


def _tree():
    return {
        "emb": np.zeros(2),
        "layers": [collections.OrderedDict(w=np.ones(3), b=np.ones(1)), Pair(np.ones(2), (np.ones(1),))],
        "extra": collections.defaultdict(list, x=np.ones(4)),
        "tup": Tup([np.ones(5)]),
    }


def test_round_trip_keeps_container_types_and_leaf_order():
    tree = _tree()
    leaves, structure = _nest.flatten(tree)
    assert [x.shape for x in leaves] == [(2,), (3,), (1,), (2,), (1,), (4,), (5,)]
    rebuilt = _nest.unflatten(structure, leaves)
    assert type(rebuilt["layers"][0]) is collections.OrderedDict
    assert type(rebuilt["layers"][1]) is Pair and rebuilt["layers"][1].first is leaves[3]
    assert type(rebuilt["extra"]) is collections.defaultdict and rebuilt["extra"].default_factory is list
    assert type(rebuilt["tup"]) is Tup
    assert _nest.leaf_paths(structure)[1] == ("layers", 0, "w")


def test_bare_leaf_is_a_tree():
    leaves, structure = _nest.flatten(np.ones(2))
    assert structure is _nest.LEAF and len(leaves) == 1
    assert _nest.map_leaves(lambda x: x + 1, np.ones(2))[0] == 2


def test_map_leaves():
    doubled = _nest.map_leaves(lambda x: 2 * x, {"a": [np.ones(1), (np.ones(1),)]})
    assert doubled["a"][1][0][0] == 2 and isinstance(doubled["a"][1], tuple)


def test_flatten_like_follows_reference_key_order_and_accepts_list_for_tuple():
    _, structure = _nest.flatten({"a": (1, 2), "b": 3})
    assert _nest.flatten_like({"b": 30, "a": [10, 20]}, structure, "g", "w") == [10, 20, 30]


@pytest.mark.parametrize(
    "other, message",
    [
        ({"a": [1, 2]}, r"g is missing key 'b' that w has"),
        ({"a": [1, 2], "b": {"c": 3}, "z": 0}, r"g has key 'z' that w lacks"),
        ({"a": [1], "b": {"c": 3}}, r"g\['a'\] has 1 items but w\['a'\] has 2"),
        ({"a": [1, 2], "b": [3]}, r"g\['b'\] is a list/tuple but w\['b'\] is a dict"),
        ({"a": [1, [2]], "b": {"c": 3}}, r"g\['a'\]\[1\] is a list/tuple but w\['a'\]\[1\] is an array leaf"),
    ],
)
def test_structure_errors_name_the_path(other, message):
    _, structure = _nest.flatten({"a": [1, 2], "b": {"c": 3}})
    with pytest.raises(ValueError, match=message):
        _nest.flatten_like(other, structure, "g", "w")


def test_flatten_aligned_checks_shapes():
    ref = {"a": [np.ones(2), np.ones((3, 1))]}
    with pytest.raises(ValueError, match=r"shape mismatch at g\['a'\]\[1\]: \(3,\) vs w\['a'\]\[1\] \(3, 1\)"):
        _nest.flatten_aligned([("w", ref), ("g", {"a": [np.ones(2), np.ones(3)]})])
    (w, g), _ = _nest.flatten_aligned([("w", ref), ("g", ref)])
    assert w == g
