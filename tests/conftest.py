"""Shared fixtures: in-process gloo groups, built once per world size per test session."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helper modules (trainer_task) import by name

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


RAY_ENV = {"env_vars": {"PYTHONPATH": os.pathsep.join([os.path.dirname(__file__),
                                                       os.path.dirname(os.path.dirname(__file__))])}}


def init_local_ray():
    """Connect to (or start) the session's embedded 2-CPU Ray cluster."""
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
                 log_to_driver=False, runtime_env=RAY_ENV)
    return ray


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded 2-CPU Ray cluster for the whole session (a Ray start costs seconds)."""
    ray = init_local_ray()
    yield ray
    ray.shutdown()
