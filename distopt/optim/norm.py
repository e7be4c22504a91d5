"""The global gradient norm and the clipping factor it gives, identical on every rank."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from distopt.collectives.base import Communicator


def global_norm(grads: Sequence[torch.Tensor], comm: Communicator, world_size: int) -> float:
    """L2 norm of the gradient pieces of every rank together; a collective where
    ``world_size > 1`` (every rank calls it, with its own shard's pieces).

    Returns:
        The norm; NaN where a piece holds a non-finite value, so every rank skips alike.
    """
    # Per-bucket norms in the gradients' dtype (one fused pass per dtype, as
    # clip_grad_norm_ does), combined in double precision on the device: one host
    # synchronisation per step, not one per bucket.
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    parts = [torch.stack(torch._foreach_norm(gs, 2.0)).double() for gs in by_dtype.values()]
    total = torch.cat(parts).square().sum().reshape(1)
    if world_size > 1:
        # Every rank must see the same number, so the skip/clip decision is unanimous.
        comm.allreduce(total, "sum")
    sumsq = float(total[0])
    return math.sqrt(sumsq) if sumsq >= 0 else float("nan")


def clip_scale(norm: float, max_norm: float | None) -> float:
    """The factor that brings a gradient of ``norm`` down to ``max_norm`` (1.0 when it is
    within it, or without clipping)."""
    return max_norm / (norm + 1e-6) if max_norm is not None and norm > max_norm else 1.0
