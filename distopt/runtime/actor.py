"""The Ray actor around one plain :class:`~distopt.runtime.worker.Worker`.

``ray.remote`` is applied to it where the group is built (:mod:`distopt.runtime.group`);
each method forwards to the worker, adding what only the actor knows (its node, address).
"""
from __future__ import annotations

import os
import signal
import socket

import ray

from distopt.data import LoaderDied
from distopt.runtime.config import TrainConfig
from distopt.runtime.evaluation import EvalReport
from distopt.runtime.faults import maybe_fire
from distopt.runtime.worker import StepReport, Worker


class WorkerActor:
    """Holds one :class:`Worker` in a Ray actor process."""

    def __init__(self, config: TrainConfig, rank: int, num_threads: int, incarnation: int = 0,
                 replacing_step: int = -1) -> None:
        import torch
        torch.set_num_threads(max(1, num_threads))  # one actor per CPU bundle: no oversubscription
        self.config, self.rank, self.incarnation = config, rank, incarnation
        self.replacing_step = replacing_step  # the 0-based step whose failure this actor replaces, or -1
        self.worker: Worker | None = None

    def setup(self) -> dict:
        # Not in __init__: an error in a method reaches the driver as the user's exception.
        maybe_fire(self.config.faults, self.rank, self.incarnation, self.replacing_step, "setup")
        self.worker = Worker(self.config, self.rank, incarnation=self.incarnation)
        return {"node_id": ray.get_runtime_context().get_node_id()}

    def address(self, loopback: bool) -> tuple[str, int]:
        """This node's address and a port that was free on it, for rank 0's store."""
        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def connect(self, host: str, port: int, group_name: str, loopback: bool, replica_distance: int) -> None:
        self.worker.connect(host, port, group_name, local_host=local_address(loopback),
                            replica_distance=replica_distance)

    def recover(self, host: str, port: int, group_name: str, rank: int, world_size: int, committed: int,
                holder_of: list[int], old_world: int, keep: int, loopback: bool, episode: int,
                replica_distance: int) -> None:
        self.worker.recover(host, port, group_name, rank, world_size, committed, holder_of, old_world,
                            keep=keep, local_host=local_address(loopback), episode=episode,
                            replica_distance=replica_distance)

    def rejoin(self, host: str, port: int, group_name: str, rank: int, world_size: int, loopback: bool,
               replica_distance: int) -> None:
        self.worker.rejoin(host, port, group_name, rank, world_size, local_host=local_address(loopback),
                           replica_distance=replica_distance)

    def run_step(self, step: int, position: dict | None = None) -> StepReport:
        try:
            return self.worker.run_step(step, position)
        except LoaderDied:  # the rank cannot go on: its death is a worker failure, recovered as one
            os.kill(os.getpid(), signal.SIGKILL)
            raise

    def evaluate(self, step: int) -> EvalReport:
        return self.worker.evaluate(step)

    def checkpoint(self, steps_done: int) -> list[dict]:
        return self.worker.checkpoint(steps_done, wait=True)

    def flush_checkpoints(self) -> list[dict]:
        return self.worker.flush_checkpoints()

    def load(self, model_state: dict, full_state: dict) -> None:
        self.worker.load(model_state, full_state)

    def state_dict(self) -> dict:
        return self.worker.state_dict()

    def info(self) -> dict:
        return {**self.worker.info(), "node_id": ray.get_runtime_context().get_node_id()}




def local_address(loopback: bool) -> str:
    """The address this node's transports bind to: loopback, or the node's IP."""
    return "127.0.0.1" if loopback else ray.util.get_node_ip_address()
