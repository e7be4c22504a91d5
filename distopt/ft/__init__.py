"""Fault tolerance as a layer on the optimizer's step hooks.

:class:`Redundancy` keeps, on every rank, what rebuilds a lost neighbour's shard and undoes
an uncommitted step (a replica its holder replays each committed update onto: in the owner's
shared memory on one host, sent gradients across hosts); the worker commits and rolls back explicitly
(:meth:`Redundancy.commit`, :meth:`Redundancy.rollback`). :mod:`distopt.ft.recovery`
rebuilds the last commit on a re-formed group.
"""
from distopt.ft.errors import RecoveryError
from distopt.ft.recovery import assemble, holders, packets
from distopt.ft.redundancy import Redundancy, replica_distance
from distopt.ft.shard import Shard
from distopt.ft.replica_log import DEPTH, ReplicaLog, check_depth
from distopt.ft.shared_replica import SharedReplica

__all__ = ["Redundancy", "RecoveryError", "Shard", "replica_distance", "ReplicaLog", "SharedReplica", "DEPTH", "check_depth",
           "assemble", "holders", "packets"]
