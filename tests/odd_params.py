"""Parameters and per-rank gradients of odd sizes, shared by the optimizer tests.

Nothing divides evenly, so parameters straddle shard and bucket boundaries.
"""
from __future__ import annotations

import torch

SHAPES = [(7, 5), (13,), (1,), (3, 3, 3), (101,)]


def init_params() -> dict[str, torch.Tensor]:
    """The same initial parameters every call (leaves that require grad, as a model's)."""
    g = torch.Generator().manual_seed(0)
    return {f"p{i}": torch.randn(s, generator=g).requires_grad_() for i, s in enumerate(SHAPES)}


def grads_of(step: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s gradients at ``step``: reproducible, different per rank and step."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    return {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(SHAPES)}


def run_committed(world: int, steps: int, rule, stage: int = 1, clip: float | None = None, redundancy=None):
    """Each rank's parameters, optimizer and redundancy (``redundancy(opt)``, or None) after
    ``steps`` steps of ``grads_of`` on ``world`` in-process ranks, each but the last committed
    (as the worker commits before a step)."""
    from distopt.collectives import in_process, run_ranks
    from distopt.optim import ShardedOptimizer

    def body(comm):
        params = init_params()
        opt = ShardedOptimizer(params, rule(), comm, zero_stage=stage, bucket_bytes=512, max_grad_norm=clip)
        red = redundancy(opt) if redundancy is not None else None
        for k in range(steps):
            if red is not None:
                red.commit(opt.step_count)
            opt.step(grads=grads_of(k, comm.rank))
        return params, opt, red
    return run_ranks(in_process(world, timeout_s=10), body)


def same_shard(params, state, opt=None, other=None) -> bool:
    """``params`` and ``state`` (per-bucket lists) equal ``opt``'s live shard, or the
    :class:`~distopt.ft.Shard` ``other``, bit for bit."""
    their_params, their_state = (opt.shard_params, opt.shard_state) if other is None else (other.params, other.state)
    return all(torch.equal(x, y) for x, y in zip(params, their_params)) and \
        all(torch.equal(x, y) for mine, theirs in zip(state.values(), their_state.values()) for x, y in zip(mine, theirs))


class TiedModel(torch.nn.Module):
    """Buffers, a frozen parameter and a weight shared by two layers: state-dict keys that
    are not one-to-one with the optimizer's parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.frozen = torch.nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.out = torch.nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.frozen(self.norm(self.embed(idx))))
