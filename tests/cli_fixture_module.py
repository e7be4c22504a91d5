"""A tiny user module for the ``distopt train`` tests: linear regression on 64 points.

Named on the command line as ``cli_fixture_module:make_model`` etc., from the tests folder.
"""
from __future__ import annotations

import torch
from torch import nn

_g = torch.Generator().manual_seed(0)
_x = torch.randn(64, 4, generator=_g)
_y = _x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1

dataset = torch.utils.data.TensorDataset(_x, _y)  # a dataset object, for --data ...:dataset


def make_dataset() -> torch.utils.data.TensorDataset:
    """The same data from a zero-arg callable, for --data ...:make_dataset."""
    return torch.utils.data.TensorDataset(_x, _y)


def make_model() -> nn.Module:
    """A 4 -> 1 linear layer."""
    return nn.Linear(4, 1)


def loss(model: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Mean squared error, with the mean absolute error as a metric."""
    x, y = batch
    err = model(x) - y
    return (err ** 2).mean(), {"mae": err.abs().mean().item()}


class Namespace:
    """Dotted attributes: --model cli_fixture_module:Namespace.factory."""

    factory = staticmethod(make_model)


# Wrong on purpose, for the error-message tests.
built_model = nn.Linear(4, 1)
not_callable = 3


def needs_an_argument(n: int) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(_x[:n], _y[:n])


def not_a_dataset() -> int:
    return 42


empty = torch.utils.data.TensorDataset(torch.zeros(0, 4))


class Stream(torch.utils.data.IterableDataset):
    """A stream of 64 samples shaped like :func:`make_dataset`'s."""

    def __iter__(self):
        data = make_dataset()
        return iter(data[i] for i in range(len(data)))


stream = Stream()
