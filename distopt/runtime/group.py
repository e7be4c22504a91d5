"""The Ray side: worker actors in a placement group, rendezvous through Ray.

``ray.remote`` is applied here, to a thin actor around the plain :class:`Worker`. The
driver never blocks on one actor while another has failed: results are collected with
``ray.wait`` and the first failure is raised at once, with the worker's rank.
"""
from __future__ import annotations

import re
import socket
import uuid

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distopt.runtime.config import TrainConfig
from distopt.runtime.errors import PlacementError, WorkerError, WorkerLost
from distopt.runtime.worker import StepReport, Worker


class WorkerActor:
    """Holds one :class:`Worker` in a Ray actor process."""

    def __init__(self, config: TrainConfig, rank: int, num_threads: int) -> None:
        import torch
        torch.set_num_threads(max(1, num_threads))  # one actor per CPU bundle: no oversubscription
        self.config, self.rank = config, rank
        self.worker: Worker | None = None

    def setup(self) -> None:
        # Not in __init__: an error in a method reaches the driver as the user's exception.
        self.worker = Worker(self.config, self.rank)

    def address(self, loopback: bool) -> tuple[str, int]:
        """This node's address and a port that was free on it, for rank 0's store."""
        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def connect(self, host: str, port: int, group_name: str, loopback: bool) -> None:
        local = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        self.worker.connect(host, port, group_name, local_host=local)

    def run_step(self, step: int) -> StepReport:
        return self.worker.run_step(step)

    def state_dict(self) -> dict:
        return self.worker.state_dict()

    def info(self) -> dict:
        return {**self.worker.info(), "node_id": ray.get_runtime_context().get_node_id()}

    def close(self) -> None:
        self.worker.close()


class RayWorkerGroup:
    """``num_workers`` actors, one per placement-group bundle, joined in one collective group."""

    def __init__(self, config: TrainConfig, loopback: bool) -> None:
        self.config = config
        self.pg = _place(config)
        self.actors = []
        try:
            self._start(config, loopback)
        except BaseException:
            self.close()
            raise

    def _start(self, config: TrainConfig, loopback: bool) -> None:
        resources = {"num_cpus": config.num_cpus_per_worker, "num_gpus": 1 if config.use_gpu else 0}
        actor_cls = ray.remote(WorkerActor)
        cfg_ref = ray.put(config)
        for rank in range(config.num_workers):
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=rank)
            self.actors.append(actor_cls.options(scheduling_strategy=strategy, max_restarts=0, **resources)
                               .remote(cfg_ref, rank, int(config.num_cpus_per_worker)))
        self._gather([a.setup.remote() for a in self.actors], "setup")
        host, port = self._gather([self.actors[0].address.remote(loopback)], "setup", ranks=[0])[0]
        name = f"distopt-{uuid.uuid4().hex[:8]}"
        self._gather([a.connect.remote(host, port, name, loopback) for a in self.actors], "setup")

    def run_step(self, step: int) -> list[StepReport]:
        """Run 0-based ``step`` on every actor; reports in rank order."""
        return self._gather([a.run_step.remote(step) for a in self.actors], f"step {step}")

    def state_dict(self) -> dict:
        """Rank 0's model weights on CPU."""
        return self._gather([self.actors[0].state_dict.remote()], "state_dict", ranks=[0])[0]

    def info(self) -> list[dict]:
        """Every actor's facts (state bytes, node, pid)."""
        return self._gather([a.info.remote() for a in self.actors], "info")

    def close(self) -> None:
        """Kill the actors and free their bundles; safe after any failure."""
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # an actor that already died is fine
                pass
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    def _gather(self, refs: list, phase: str, ranks: list[int] | None = None) -> list:
        """Results in order; the first failing rank raises immediately, naming it."""
        ranks = ranks if ranks is not None else list(range(len(refs)))
        rank_of = {ref: r for ref, r in zip(refs, ranks)}
        results, pending = {}, list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[ref] = _get(ref, rank_of[ref], phase)
        return [results[ref] for ref in refs]


def _get(ref, rank: int, phase: str):
    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        headline = f"{type(cause).__name__}: {cause}" if cause is not None else "see the traceback"
        trace = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        raise WorkerError(rank, phase, f"{headline}\n\nworker traceback:\n{trace}", cause) from None
    except RayActorError as e:
        raise WorkerLost(rank, phase, str(e).strip().splitlines()[0] if str(e).strip() else "actor died") from None


def _place(config: TrainConfig):
    bundle = {"CPU": float(config.num_cpus_per_worker)}
    if config.use_gpu:
        bundle["GPU"] = 1.0
    total = ray.cluster_resources()
    for key, need in bundle.items():
        if need * config.num_workers > total.get(key, 0):
            raise PlacementError(
                f"num_workers={config.num_workers} x {bundle} needs {need * config.num_workers:g} {key}, the cluster "
                f"has {total.get(key, 0):g}: lower num_workers or the per-worker resources, or add nodes")
    pg = placement_group([dict(bundle) for _ in range(config.num_workers)], strategy=config.placement_strategy)
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
