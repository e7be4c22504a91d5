"""Parameters and per-rank gradients of odd sizes, shared by the optimizer tests.

Nothing divides evenly, so parameters straddle shard and bucket boundaries.
"""
from __future__ import annotations

import torch

SHAPES = [(7, 5), (13,), (1,), (3, 3, 3), (101,)]


def init_params() -> dict[str, torch.Tensor]:
    """The same initial parameters every call."""
    g = torch.Generator().manual_seed(0)
    return {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(SHAPES)}


def grads_of(step: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s gradients at ``step``: reproducible, different per rank and step."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    return {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(SHAPES)}
