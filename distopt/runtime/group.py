"""The Ray side: worker actors in a placement group, rendezvous through Ray.

The actors (:mod:`distopt.runtime.actor`) sit one per placement-group bundle (reserved by
:mod:`distopt.runtime.placement`); this module owns who is in the group: spawning,
replacing, shrinking, growing back and re-forming it. What the actors return is collected against deadlines (:mod:`distopt.runtime.results`),
so a dead, stopped or failing worker is seen in seconds and never waited on forever.
"""
from __future__ import annotations

import logging
import uuid

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distopt.ft.redundancy import replica_distance
from distopt.optim.plan import shard_count
from distopt.runtime.actor import WorkerActor
from distopt.runtime.config import TrainConfig
from distopt.runtime.errors import WorkerLost
from distopt.runtime.placement import reserve
from distopt.runtime.policy import Outcome, WorkerStatus
from distopt.runtime.results import gather, get, outcomes

log = logging.getLogger("distopt")


class RayWorkerGroup:
    """``num_workers`` actors, one per placement-group bundle, joined in one collective group."""

    def __init__(self, config: TrainConfig, loopback: bool) -> None:
        self.config, self.loopback = config, loopback
        self.pg = reserve(config)
        self.actors: list = []
        self.bundles: list[int] = []  # placement-group bundle of each rank's actor
        self.incarnations = 0
        self.nodes: list[str] = []
        self.spares: list[tuple] = []  # (actor, bundle, setup ref): warm stand-ins for lost ranks
        self.free_bundles: list[int] = []  # bundles of ranks a shrink dropped: where growth goes
        self.joining: list[tuple] = []  # (actor, bundle, setup ref): started for growth, not yet in
        self.refill: list[int] = []  # bundles that host new spares once the group commits again
        self.replica_distance = 1  # of the group as last formed: rank r + d holds r's replica
        self._actor_cls = ray.remote(WorkerActor)
        self._cfg_ref = ray.put(config)
        try:
            self.actors = [self._spawn(r, r) for r in range(config.num_workers)]
            self.bundles = list(range(config.num_workers))
            for b in range(config.num_workers, config.num_workers + config.spare_workers):
                self._add_spare(b)
            self.nodes = [i["node_id"] for i in gather([a.setup.remote() for a in self.actors], "setup", self.config)]
            d = self._distance(self.nodes)
            gather(self._rendezvous(lambda r, a, host, port, name: a.connect.remote(host, port, name, loopback, d)),
                   "rendezvous", config)
            self.replica_distance = d
        except BaseException:
            self.close()
            raise

    def _spawn(self, rank: int, bundle: int, incarnation: int = 0, replacing_step: int = -1):
        c = self.config
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=bundle)
        return self._actor_cls.options(scheduling_strategy=strategy, max_restarts=0, num_cpus=c.num_cpus_per_worker,
                                       num_gpus=1 if c.use_gpu else 0).remote(
            self._cfg_ref, rank, int(c.num_cpus_per_worker), incarnation, replacing_step)

    def _rendezvous(self, call) -> list:
        """Start ``call(rank, actor, host, port, group_name)`` on every actor, around rank 0's
        address; the refs. Raises WorkerLost when rank 0 cannot give its address."""
        host, port = gather([self.actors[0].address.remote(self.loopback)], "rendezvous", self.config, ranks=[0])[0]
        name = f"distopt-{uuid.uuid4().hex[:8]}"
        return [call(r, a, host, port, name) for r, a in enumerate(self.actors)]

    # --- steps ----------------------------------------------------------------------
    def run_step(self, step: int, position: dict | None = None) -> list[Outcome]:
        """Run 0-based ``step`` from read ``position`` on every actor; one :class:`Outcome`
        per rank, in rank order.

        Waits at most ``step_timeout_s``; once a rank has failed, the others get
        ``collective_timeout_s`` plus a margin to report before they count as hung.
        """
        return outcomes([a.run_step.remote(step, position) for a in self.actors], self.config)

    def run_eval(self, step: int) -> list[Outcome]:
        """Evaluate on every actor after ``step`` committed steps; one :class:`Outcome` per rank."""
        return outcomes([a.evaluate.remote(step) for a in self.actors], self.config)

    # --- recovery -------------------------------------------------------------------
    def _add_spare(self, bundle: int) -> None:
        self.incarnations += 1  # a spare never fires an injected fault
        actor = self._spawn(-1, bundle, self.incarnations)
        self.spares.append((actor, bundle, actor.setup.remote()))

    def replace(self, lost: tuple[int, ...], step: int = -1) -> bool:
        """New actors for ``lost`` ranks (lost in 0-based ``step``): warm spares first, else
        fresh ones in the lost bundles.

        Returns False when no replacement is ready within ``replace_timeout_s``, or one
        died while starting (its node went away); the group is then as before.
        """
        self.kill(lost)
        fresh, refs, swapped = {}, {}, {}
        for r in lost:
            if self.spares:
                actor, bundle, ref = self.spares.pop(0)
                swapped[r] = (self.bundles[r], bundle)
                self.bundles[r] = bundle
                fresh[r], refs[r] = actor, ref
            else:
                self.incarnations += 1
                fresh[r] = self._spawn(r, self.bundles[r], self.incarnations, step)
                refs[r] = fresh[r].setup.remote()
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.config.replace_timeout_s)
        nodes = {}
        if len(ready) == len(refs):
            try:
                nodes = {r: get(refs[r], r, "replacement setup")["node_id"] for r in fresh}
            except WorkerLost:  # a user error in setup still raises (WorkerError)
                nodes = {}
        if len(nodes) < len(fresh):
            for a in fresh.values():
                ray.kill(a, no_restart=True)
            for r, (own, spare) in swapped.items():  # the spares' bundles host new spares
                self.bundles[r] = own
                self._add_spare(spare)
            return False
        for r, a in fresh.items():
            self.nodes[r], self.actors[r] = nodes[r], a
        self.refill += [own for own, _ in swapped.values()]  # the lost actors' bundles host the next spares
        return True

    def refill_spares(self) -> None:
        """Start the spares that replacements used, in the bundles of the ranks they replaced.

        The controller calls this once the group has committed a step again: a new actor's
        start (a process, its imports, its model) would otherwise compete with the recovery
        for the node's cores (on the benchmark's 2 cores it made a warm recovery 0.5 s slower).
        """
        while self.refill:
            self._add_spare(self.refill.pop(0))

    def regroup(self, committed: int, order: list[int], holder_of: list[int], old_world: int,
                keep: int, episode: int) -> list[Outcome]:
        """Re-form the collective group from ``order`` (current ranks, new rank = position).

        Returns one :class:`Outcome` per new rank. When one is not ok (a rank failed during
        the recovery) the group keeps all ``len(order)`` actors, none dropped, and the
        caller recovers again with the same ``episode`` (see :meth:`Worker.recover`).
        """
        self.free_bundles += [b for r, b in enumerate(self.bundles) if r not in order and b not in self.free_bundles]
        self._reorder(order)
        world = len(order)
        ended = self._reform(lambda r, a, host, port, name, d: a.recover.remote(
            host, port, name, r, world, committed, holder_of, old_world, keep, self.loopback, episode, d), keep)
        if keep < world and all(o.status.ok for o in ended):
            self.kill(tuple(range(keep, world)))
            self.free_bundles += self.bundles[keep:]
            del self.actors[keep:], self.bundles[keep:], self.nodes[keep:]
        return ended

    def _reorder(self, order: list[int]) -> None:
        """Current ranks ``order`` become ranks 0, 1, ...: actors, bundles and nodes alike."""
        self.actors = [self.actors[o] for o in order]
        self.bundles = [self.bundles[o] for o in order]
        self.nodes = [self.nodes[o] for o in order]

    def _distance(self, nodes: list[str]) -> int:
        """The replica distance for a group on ``nodes`` (one per rank); warns when some
        shard would share its node with its replica."""
        d, shared = replica_distance(nodes)
        if shared and len(set(nodes)) > 1 and self.config.fault_tolerant and self.config.zero_stage >= 1:
            log.warning("ranks %s share a node with the rank holding their replica (no replica distance separates "
                        "them on this placement): losing that node falls back to a checkpoint", shared)
        return d

    def _reform(self, call, keep: int) -> list[Outcome]:
        """Re-form the group: :meth:`_rendezvous` with each rank's end as an Outcome instead of
        the first failure raised. ``call`` also takes the replica distance of the first
        ``keep`` ranks, the group that goes on, which is kept once every rank is in."""
        d = self._distance(self.nodes[:keep])
        try:
            refs = self._rendezvous(lambda r, a, host, port, name: call(r, a, host, port, name, d))
        except WorkerLost:  # nothing started: the others are as they were
            return [Outcome(WorkerStatus(0, ok=False, dead=True))] + \
                [Outcome(WorkerStatus(r, ok=False)) for r in range(1, len(self.actors))]
        # A rank whose store never answers gives up after up to two timeouts (the store
        # client retries its connect once), then one more for the group itself.
        ended = outcomes(refs, self.config, timeouts=3)
        if all(o.status.ok for o in ended):
            self.replica_distance = d
        return ended

    def rejoin(self, order: list[int], keep: int) -> list[Outcome]:
        """Re-form the group from ``order`` (old ranks, new rank = position) with no state
        restored from memory (a checkpoint is loaded next); ranks from ``keep`` on are dropped.

        Returns one :class:`Outcome` per rank that goes on."""
        self.kill(tuple(order[keep:]))
        self.free_bundles += [b for r, b in enumerate(self.bundles) if r not in order[:keep]]
        self._reorder(order[:keep])
        return self._reform(lambda r, a, host, port, name, d: a.rejoin.remote(host, port, name, r, keep,
                                                                              self.loopback, d), keep)

    # --- growing back ---------------------------------------------------------------
    def ready_to_grow(self, target: int) -> int:
        """Start actors for the bundles a shrink freed (once); how many have their model built.

        Never blocks: an actor whose bundle has no node yet simply stays pending.
        """
        want = min(target - len(self.actors), len(self.free_bundles))
        while len(self.joining) < want:
            bundle = self.free_bundles[len(self.joining)]
            self.incarnations += 1
            actor = self._spawn(-1, bundle, self.incarnations)
            self.joining.append((actor, bundle, actor.setup.remote()))
        if not self.joining:
            return 0
        refs = [ref for _, _, ref in self.joining]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        failed = []
        for j in [j for j in self.joining if j[2] in ready]:
            try:
                ray.get(j[2], timeout=0)
            except Exception:  # its node went away mid-start: try that bundle again later
                failed.append(j)
                ray.kill(j[0], no_restart=True)
        self.joining = [j for j in self.joining if j not in failed]
        return len(ready) - len(failed)

    def grow(self, committed: int, count: int, episode: int) -> list[Outcome]:
        """Add ``count`` ready joining actors as the last ranks and re-form the group; a collective.

        Every old shard is still held by its owner, so the state is resharded from memory.
        Returns one :class:`Outcome` per rank of the grown group (see :meth:`regroup`).
        """
        ready = set(ray.wait([ref for _, _, ref in self.joining], num_returns=len(self.joining), timeout=0)[0])
        old_world = len(self.actors)
        taken = [j for j in self.joining if j[2] in ready][:count]
        for actor, bundle, ref in taken:
            self.nodes.append(get(ref, len(self.actors), "setup")["node_id"])
            self.actors.append(actor)
            self.bundles.append(bundle)
            self.free_bundles.remove(bundle)
        self.joining = [j for j in self.joining if j not in taken]
        shards = shard_count(old_world, self.config.zero_stage)
        holder_of = list(range(shards))
        world = len(self.actors)
        return self._reform(lambda r, a, host, port, name, d: a.recover.remote(
            host, port, name, r, world, committed, holder_of, old_world, world, self.loopback, episode, d), world)

    def kill(self, ranks: tuple[int, ...]) -> None:
        """Kill the actors of ``ranks`` (dead, hung or dropped)."""
        for r in ranks:
            try:
                ray.kill(self.actors[r], no_restart=True)
            except Exception:  # already gone
                pass

    # --- checkpoints ----------------------------------------------------------------
    def checkpoint(self, steps_done: int) -> list[dict]:
        """Every rank writes its part now and waits; their file records."""
        return [r for rs in gather([a.checkpoint.remote(steps_done) for a in self.actors], "checkpoint", self.config)
                for r in rs]

    def flush_checkpoints(self) -> list[dict]:
        """Wait for background checkpoint writes; their file records."""
        return [r for rs in gather([a.flush_checkpoints.remote() for a in self.actors], "checkpoint", self.config)
                for r in rs]

    def load(self, model_state: dict, full_state: dict) -> None:
        """Every rank takes weights and optimizer state from a checkpoint."""
        refs = ray.put(model_state), ray.put(full_state)
        gather([a.load.remote(*refs) for a in self.actors], "resume", self.config)

    # --- results --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Rank 0's model weights on CPU."""
        return gather([self.actors[0].state_dict.remote()], "state_dict", self.config, ranks=[0])[0]

    def info(self) -> list[dict]:
        """Every actor's facts (state bytes, node, pid)."""
        return gather([a.info.remote() for a in self.actors], "info", self.config)

    def close(self) -> None:
        """Kill the actors and spares and free their bundles; safe after any failure."""
        self.kill(tuple(range(len(self.actors))))
        self.actors = []
        for actor, _, _ in self.spares + self.joining:
            ray.kill(actor, no_restart=True)
        self.spares, self.joining = [], []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
