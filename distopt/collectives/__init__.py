"""The allreduce layer: one communicator contract, a torch.distributed backend, bucketing.

Nothing here imports Ray: these run in one process, under torch.multiprocessing, or on a
GPU box with no scheduler at all.
"""
from distopt.collectives.base import CollectiveError, Communicator, chunk_numel, chunk_range
from distopt.collectives.buckets import DEFAULT_BUCKET_BYTES, FlatBuffer, Layout, allreduce_tensors, layout
from distopt.collectives.in_process import RankFailure, in_process, run_ranks
from distopt.collectives.pending import Pending
from distopt.collectives.rendezvous import free_port
from distopt.collectives.torch_dist import TorchCommunicator

__all__ = [
    "CollectiveError", "Communicator", "TorchCommunicator", "in_process", "run_ranks", "free_port",
    "chunk_numel", "chunk_range", "DEFAULT_BUCKET_BYTES", "FlatBuffer", "Layout", "layout",
    "allreduce_tensors", "Pending", "RankFailure",
]
