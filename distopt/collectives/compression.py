"""Wire compression: values travel as bf16/fp16, sums are taken in the tensor's own dtype.

A plain low-precision allreduce adds in the wire dtype at every hop. Here the reduction
half is an all-to-all: each rank receives every peer's narrowed copy of its own chunk and
sums them widened, in rank order (so every run gives the same bits). Traffic equals a ring
reduce-scatter in the wire dtype. ``reduce_scatter`` returns that wide sum unrounded;
``allreduce`` then gathers the chunks narrowed, so its result is rounded once to the wire
dtype.
"""
from __future__ import annotations

import torch

from distopt.collectives.base import Communicator, chunk_numel, chunk_range
from distopt.collectives.pending import then


def reduce_scatter(comm: "Communicator", flat: torch.Tensor, op: str, wire_dtype: torch.dtype,
                   async_op: bool = False):
    """This rank's chunk of the sum (or mean) of ``flat``, accumulated in ``flat.dtype``.

    With ``async_op`` the exchange is started and a handle returned; only the local sum is
    left for its ``wait``, so no collective starts out of order.
    """
    n, w = flat.numel(), comm.world_size
    c = chunk_numel(n, w)
    wire = torch.zeros(c * w, dtype=wire_dtype, device=flat.device)
    # Scale before narrowing: a mean of fp16 values may overflow as a sum.
    wire[:n].copy_(flat / w if op == "mean" else flat)
    exchange = comm.all_to_all(wire, async_op=True)
    start, end = chunk_range(n, w, comm.rank)

    def total() -> torch.Tensor:
        received = exchange.wait()
        return received.view(w, c).to(flat.dtype).sum(dim=0)[: end - start]
    return then(total, async_op)


def allreduce(comm: "Communicator", t: torch.Tensor, op: str, wire_dtype: torch.dtype) -> torch.Tensor:
    """Reduce ``t`` in place: wide sums, then one narrowing for the way back."""
    flat = t.view(-1)
    shard = reduce_scatter(comm, flat, op, wire_dtype)
    gathered = comm.allgather(shard.to(wire_dtype), numel=flat.numel())
    flat.copy_(gathered)
    return t
