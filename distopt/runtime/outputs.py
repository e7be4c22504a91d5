"""What the user's loss and eval functions return: a scalar, or ``(scalar, metrics dict)``."""
from __future__ import annotations

from typing import Any

import torch


def split_output(out: Any) -> tuple[Any, Any]:
    """``(value, metrics)`` of a function's result: ``out`` itself with no metrics, or the
    items of the tuple it returned."""
    return (out[0], out[1] if len(out) > 1 else {}) if isinstance(out, tuple) else (out, {})


def scalar(v: Any, what: str) -> Any:
    """A one-element value, left where it is (a device tensor is read once, after the update).

    Raises:
        ValueError: ``v`` has more than one element (``what`` names it).
    """
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"the {what} has shape {tuple(v.shape)}: return a scalar (e.g. .mean())")
        return v.detach().reshape(())
    return float(v)


def add_metrics(into: dict, extra: dict) -> dict:
    """``into`` with ``extra``'s values added to those of the same name."""
    return {**into, **{k: into[k] + v if k in into else v for k, v in extra.items()}}
