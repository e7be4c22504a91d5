"""Fault tolerance as a layer on the optimizer's step hooks.

:class:`Redundancy` keeps, on every rank, what rebuilds a lost neighbour's shard and undoes
an uncommitted step (a replica kept by replay across hosts, by copies and a gradient log in
shared memory on one host); the worker commits and rolls back explicitly
(:meth:`Redundancy.commit`, :meth:`Redundancy.rollback`). :mod:`distopt.ft.recovery`
rebuilds the last commit on a re-formed group.
"""
from distopt.ft.errors import RecoveryError
from distopt.ft.recovery import assemble, holders, packets
from distopt.ft.redundancy import Redundancy, Shard, replica_distance
from distopt.ft.replica_log import DEPTH, ReplicaLog, check_depth

__all__ = ["Redundancy", "RecoveryError", "Shard", "replica_distance", "ReplicaLog", "DEPTH", "check_depth",
           "assemble", "holders", "packets"]
