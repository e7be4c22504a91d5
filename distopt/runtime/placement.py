"""Reserving the cluster for a worker group: one Ray placement-group bundle per worker and spare."""
from __future__ import annotations

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group

from distopt.runtime.config import TrainConfig
from distopt.runtime.errors import PlacementError


def reserve(config: TrainConfig):
    """A ready placement group of one bundle per worker and spare (CPUs, and a GPU with
    ``use_gpu``), placed with ``placement_strategy``.

    Raises:
        PlacementError: the cluster is too small, or the bundles were not placed within
            ``placement_timeout_s``; the message names what to lower or free.
    """
    bundle = {"CPU": float(config.num_cpus_per_worker)}
    if config.use_gpu:
        bundle["GPU"] = 1.0
    total = ray.cluster_resources()
    count = config.num_workers + config.spare_workers
    for key, need in bundle.items():
        if need * count > total.get(key, 0):
            raise PlacementError(
                f"num_workers={config.num_workers} (+ {config.spare_workers} spare) x {bundle} needs "
                f"{need * count:g} {key}, the cluster has {total.get(key, 0):g}: lower num_workers, spare_workers "
                f"or the per-worker resources, or add nodes")
    pg = placement_group([dict(bundle) for _ in range(count)], strategy=config.placement_strategy)
    try:
        ray.get(pg.ready(), timeout=config.placement_timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(
            f"{config.num_workers} workers x {bundle} with strategy {config.placement_strategy} could not be placed "
            f"within {config.placement_timeout_s:g}s (cluster resources {_short(total)}): free resources, use "
            f"placement_strategy='PACK', or ask for fewer workers") from None
    return pg


def _short(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items() if k in ("CPU", "GPU")) + "}"
