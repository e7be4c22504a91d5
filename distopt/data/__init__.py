"""The data layer: the sampling contract as code (README, "Data").

``Trainer(data=...)`` takes a map-style dataset, a torch ``IterableDataset``, :func:`shards`
(shard files and a reader), a ``ray.data.Dataset``, or a zero-argument module-level factory
of any of them. Streams are read from a read position (:mod:`distopt.data.positions`) that
the trainer commits with each step and stores in checkpoints. Imports torch only.
"""
from distopt.data.errors import DataError, LoaderDied
from distopt.data.feed import Feed
from distopt.data.kinds import KINDS, STREAMS, kind_of
from distopt.data.shards import SHUFFLE_BUFFER, Shards, record_order, shard_order, shards

__all__ = ["shards", "Shards", "SHUFFLE_BUFFER", "shard_order", "record_order", "DataError", "LoaderDied", "Feed",
           "kind_of", "KINDS", "STREAMS"]
