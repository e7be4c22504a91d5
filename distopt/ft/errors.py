"""The fault-tolerance layer's own error."""
from __future__ import annotations


class RecoveryError(RuntimeError):
    """The state of the last commit cannot be rebuilt from memory (a shard and its replica
    were both lost). Restore from a checkpoint instead."""
