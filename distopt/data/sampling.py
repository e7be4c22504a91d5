"""The sampling contract (DESIGN.md): which dataset indices every rank uses at every step.

Pure functions of (dataset length, global batch, seed, step, rank, world size), so any
run can be replayed, checked against one process, or redone after a failure without
iterator state.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset, default_collate


def steps_per_epoch(n: int, global_batch_size: int) -> int:
    """Full global batches in one pass over ``n`` samples (the tail is dropped)."""
    return n // global_batch_size


def global_indices(n: int, global_batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The ``global_batch_size`` indices of 0-based ``step``.

    Epoch ``e = step // steps_per_epoch`` visits
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``; the step takes
    the slice at ``(step % steps_per_epoch) * global_batch_size``.
    """
    per_epoch = steps_per_epoch(n, global_batch_size)
    if per_epoch < 1:
        raise ValueError(f"dataset has {n} samples, fewer than one global batch of {global_batch_size}")
    epoch, position = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    start = position * global_batch_size
    return perm[start:start + global_batch_size]


def rank_indices(n: int, global_batch_size: int, seed: int, step: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous ``global_batch_size / world_size`` share of the step's indices."""
    per_rank = global_batch_size // world_size
    return global_indices(n, global_batch_size, seed, step)[rank * per_rank:(rank + 1) * per_rank]


def micro_batches(indices: torch.Tensor, accumulation_steps: int) -> list[list[int]]:
    """Split one rank's indices into equal contiguous micro-batches."""
    return [chunk.tolist() for chunk in indices.chunk(accumulation_steps)]


def fetch(data: Any, indices: list[int]) -> Any:
    """``default_collate([data[i] for i in indices])``, in one indexing call where the dataset allows."""
    if isinstance(data, TensorDataset):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [t[idx] for t in data.tensors]  # what default_collate gives: a list, rows stacked
    getitems = getattr(data, "__getitems__", None)
    if getitems is not None:  # torch's batched-fetch protocol
        return default_collate(getitems(list(indices)))
    return default_collate([data[i] for i in indices])
