"""Samples as the data layer sees them: their structure, checked against the first one, and
micro-batches collated from a rank's contiguous share of a global batch."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch.utils.data import default_collate

import torch


def structure(sample: Any) -> Any:
    """A sample's structure: container types and keys, and each array's dtype and shape."""
    if isinstance(sample, torch.Tensor) or (hasattr(sample, "dtype") and hasattr(sample, "shape")):
        return ("array", str(sample.dtype), tuple(sample.shape))
    if isinstance(sample, Mapping):
        return {k: structure(v) for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return (type(sample).__name__, tuple(structure(v) for v in sample))
    return type(sample).__name__


class StructureCheck:
    """Remembers the first sample's structure and refuses any sample with another one."""

    def __init__(self) -> None:
        self.first: Any = None

    def __call__(self, sample: Any, where: Callable[[], str]) -> Any:
        """``sample`` if its structure is the first sample's; ``where()`` names it otherwise.

        Raises:
            DataError: the structure differs (other keys, dtypes, shapes or types).
        """
        from distopt.data.errors import DataError
        got = structure(sample)
        if self.first is None:
            self.first = got
        elif got != self.first:
            raise DataError(f"{where()} has structure {got}, the first sample had {self.first}: every sample must "
                            f"have one structure (same keys, types, dtypes and shapes) to be batched")
        return sample


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it (dicts, lists and tuples rebuilt)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def rank_share(samples: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s contiguous ``1/world_size`` of a global batch's samples."""
    per_rank = len(samples) // world_size
    return samples[rank * per_rank:(rank + 1) * per_rank]


def collate_micro_batches(samples: list, accumulation_steps: int) -> list:
    """``default_collate`` of each of ``accumulation_steps`` equal contiguous micro-batches."""
    size = len(samples) // accumulation_steps
    return [default_collate(samples[m * size:(m + 1) * size]) for m in range(accumulation_steps)]
