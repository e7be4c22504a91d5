"""What every update rule shares: the learning rate at a step, ``update`` as
``apply(prepare(...))``, and its hyperparameters as plain data (:mod:`distopt.optim.rules`)."""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Callable, Union

import torch

LR = Union[float, Callable[[int], float]]


def lr_at(lr: LR, step: int) -> float:
    """The learning rate for update ``step`` (1-based), from a constant or a schedule."""
    value = lr(step) if callable(lr) else lr
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"learning rate at step {step} is {value!r}: a schedule must return a finite float >= 0")
    return float(value)


class UpdateRule:
    """Base of the frozen rule dataclasses, which give ``name``, ``whole_matrices``,
    ``init``, ``prepare`` and ``apply``."""

    def update(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: Any, step: int) -> Any:
        """Apply one step in place to ``params`` and ``state``; ``grads`` are not modified."""
        return self.apply(params, self.prepare(params, grads, step), state, step)

    def config(self) -> dict:
        """Hyperparameters as plain data (a schedule is recorded by name)."""
        out = {"rule": self.name, **asdict(self)}
        if callable(self.lr):
            out["lr"] = f"schedule:{getattr(self.lr, '__qualname__', type(self.lr).__name__)}"
        for key in ("betas", "ns_coefficients"):
            if key in out:
                out[key] = list(out[key])
        return out
