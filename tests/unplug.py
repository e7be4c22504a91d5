"""Pulling a node out of a cluster_utils.Cluster once a run has committed a few steps."""
from __future__ import annotations

import threading
import time
from pathlib import Path


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
