"""Shared fixtures: in-process gloo groups, built once per world size per test session."""
from __future__ import annotations

import pytest

from distopt.collectives import in_process


@pytest.fixture(scope="session")
def groups():
    """``groups(n)`` returns a cached in-process group of ``n`` ranks (healthy ones only)."""
    cache: dict[int, list] = {}

    def get(n: int) -> list:
        if n not in cache or any(c._broken for c in cache[n]):
            cache[n] = in_process(n, timeout_s=20.0)
        return cache[n]

    yield get
    for comms in cache.values():
        for c in comms:
            c.close()
