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


def batches(steps: int, global_batch_size: int, seed: int = 0, n: int = 96):
    """The global batches of the map-style sampling contract of DESIGN.md, written out again."""
    data = make_data(n)
    per_epoch = n // global_batch_size
    for k in range(steps):
        epoch, pos = divmod(k, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        yield data[perm[pos * global_batch_size:(pos + 1) * global_batch_size]]


def reference(make_torch_opt, steps: int, global_batch_size: int, seed: int = 0, n: int = 96) -> dict:
    """One process, torch.optim (``make_torch_opt(model.parameters())``), on the global batches."""
    return reference_groups(lambda model: [make_torch_opt(model.parameters())], steps, global_batch_size, seed, n)


def reference_groups(make_torch_opts, steps: int, global_batch_size: int, seed: int = 0, n: int = 96) -> dict:
    """One process, the torch optimizers ``make_torch_opts(model)`` (a list), on the global batches."""
    torch.manual_seed(seed)
    model = make_model()
    opts = make_torch_opts(model)
    for x, y in batches(steps, global_batch_size, seed, n):
        for o in opts:
            o.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        for o in opts:
            o.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def decay_split(model: torch.nn.Module) -> list[dict]:
    """AdamW's split, the undecayed group at half the rate (module-level: workers import it)."""
    from distopt.optim import decay_groups
    decayed, rest = decay_groups(model, 0.1)
    return [decayed, {**rest, "lr": 5e-3}]


def hybrid_split(model: torch.nn.Module) -> list[dict]:
    """Muon for the hidden matrix (the first layer's weight), AdamW for the rest."""
    from distopt.optim import muon, muon_groups
    return muon_groups(model, muon(0.02), weight_decay=0.1)
