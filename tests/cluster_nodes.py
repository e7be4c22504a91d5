"""Two-node cluster_utils.Cluster for a test module, and pulling a node out mid-run."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

from conftest import RAY_ENV, init_local_ray


def two_node_cluster(cpus_per_node: int) -> Iterator:
    """For a module fixture (``yield from``): the session's Ray stops, a head and one more
    node with ``cpus_per_node`` CPUs each start, and the session's Ray comes back after."""
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    cluster.add_node(num_cpus=cpus_per_node)
    ray.init(address=cluster.address, runtime_env=RAY_ENV, configure_logging=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    init_local_ray()  # later tests expect the session's cluster


def unplug_after(cluster, node, metrics: Path, steps: int = 3, within_s: float = 120.0) -> threading.Thread:
    """Remove ``node`` (ungracefully) once ``metrics`` (a run's metrics.jsonl) lists ``steps`` steps.

    Watches from a daemon thread, which it returns, started; gives up after ``within_s``.
    """
    def watch() -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
                cluster.remove_node(node, allow_graceful=False)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
