"""The documented global order of streams and shards, written out again in one process, and
training on it with torch.optim: the oracle of the data tests."""
from __future__ import annotations

import numpy as np
import torch

from trainer_task import make_model

_MIX = 1_000_003


def shuffle_buffer(items: list, buffer: int, seed: int, epoch: int, shard: int) -> list:
    """README's shuffle buffer, applied to the items themselves."""
    g = torch.Generator().manual_seed(((seed * _MIX + epoch) * _MIX + shard) % 2**63)
    slots, out = list(items[:buffer]), []
    draws = torch.randint(buffer, (max(len(items) - buffer, 0),), generator=g).tolist()
    for item, j in zip(items[buffer:], draws):
        out.append(slots[j])
        slots[j] = item
    return out + [slots[i] for i in torch.randperm(len(slots), generator=g).tolist()]


def shards_stream(paths: list[str], buffer: int, seed: int, epochs: int) -> list[torch.Tensor]:
    out = []
    for e in range(epochs):
        for s in torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed + e)).tolist():
            out += [torch.from_numpy(np.array(r)) for r in shuffle_buffer(list(np.load(paths[s])), buffer, seed, e, s)]
    return out


def iterable_stream(dataset, epochs: int) -> list[torch.Tensor]:
    out = []
    for e in range(epochs):
        dataset.set_epoch(e)
        out += list(dataset)
    return out


def train(stream: list[torch.Tensor], steps: int, batch: int, seed: int = 0, lr: float = 1e-2):
    """Weights and per-step losses of Adam on consecutive global batches of ``stream``."""
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for k in range(steps):
        rows = torch.stack(stream[k * batch:(k + 1) * batch]).float()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(rows[:, :5]), rows[:, 5:8])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses
