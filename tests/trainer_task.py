"""A small task shared by the Trainer tests: an MLP regressing a fixed nonlinear target."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def make_data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 5, generator=g)
    y = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2]), x[:, 3] - x[:, 4] ** 2], dim=1)
    return TensorDataset(x, y)


def loss(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
    x, y = batch
    mse = torch.nn.functional.mse_loss(model(x), y)
    return mse, {"mae": (model(x) - y).abs().mean().detach()}


def reference(make_torch_opt, steps: int, global_batch_size: int, seed: int = 0, n: int = 96) -> dict:
    """One process, torch.optim, the sampling contract of DESIGN.md written out again."""
    data = make_data(n)
    torch.manual_seed(seed)
    model = make_model()
    opt = make_torch_opt(model.parameters())
    per_epoch = n // global_batch_size
    for k in range(steps):
        epoch, pos = divmod(k, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        idx = perm[pos * global_batch_size:(pos + 1) * global_batch_size]
        x, y = data[idx]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
