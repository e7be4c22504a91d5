"""One shard's parameters and optimizer state at an update: what a replica or a snapshot holds."""
from __future__ import annotations

import torch

from distopt.optim.sharded import ShardedOptimizer
from distopt.optim.state_io import fill_shard, full_pieces


class Shard:
    """Parameters and state of one shard, as lists of per-bucket tensors, at update ``step``."""

    def __init__(self, params: list[torch.Tensor], state, step: int) -> None:
        self.params, self.state, self.step = params, state, step

    @classmethod
    def like(cls, params: list[torch.Tensor], opt: ShardedOptimizer) -> "Shard":
        return cls([torch.empty_like(p) for p in params], opt.init_state(params), -1)

    def copy_from(self, params: list[torch.Tensor], state: dict, step: int) -> None:
        torch._foreach_copy_(self.params + _kept(self.state), params + _kept(state))
        self.step = step

    def copy_to(self, params: list[torch.Tensor], state: dict) -> None:
        torch._foreach_copy_(params + _kept(state), self.params + _kept(self.state))

    def fill(self, opt: ShardedOptimizer, rank: int, full: dict | None = None) -> None:
        """Become shard ``rank``'s slice of ``opt``'s parameters (the same on every rank), with
        zero state, or with ``rank``'s slice of the full state dict ``full``."""
        torch._foreach_copy_(self.params, [opt.params_flat.range(s, e) for s, e in opt.plan.ranges(rank)])
        if full is None:
            for t in _kept(self.state):
                t.zero_()
        else:
            fill_shard(opt, full, rank, self.state)

    def replay(self, opt: ShardedOptimizer, step: int, grads: list[torch.Tensor], scale: float, rank: int) -> None:
        """Apply update ``step`` as shard ``rank``'s owner did: same gradients, clipping
        factor and hyperparameters, so the same bits."""
        opt.rules.apply(step, range(len(self.params)), self.params, grads, self.state, scale, rank)
        self.step = step

    def packet(self) -> torch.Tensor:
        """Parameters then each state field, each as long as the parameters (zeros where a
        bucket's rule keeps no such field), flattened into one tensor (for a broadcast)."""
        parts = self.params + [t for ts in self.state.values() for t in full_pieces(ts, self.params)]
        return torch.cat([t.reshape(-1) for t in parts])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params + _kept(self.state))


def _kept(state: dict) -> list[torch.Tensor]:
    # Empty tensors stand for fields a bucket's rule does not keep: nothing to copy.
    return [t for ts in state.values() for t in ts if t.numel()]
