"""Per-framework implementations of the gradient API, operating on flat lists of leaves.

Each backend module (``torch_backend``, ``numpy_backend``) exposes the same names:
``NAME``, ``ARRAY_TYPE``, ``HAS_AUTODIFF``, ``FLOAT_FIX``, ``is_float``, ``variable``,
``is_variable``, ``stop_gradient``, ``execute_with_gradients``,
``gradient_descent_update`` and ``adam_update``. The front end
(`distopt.gradients`) flattens and validates the trees; backends never see nesting.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, NamedTuple

import numpy as np

_MODULES = {"numpy": "distopt.backends.numpy_backend", "torch": "distopt.backends.torch_backend"}

NAMES = tuple(sorted(_MODULES))


class AdamHyper(NamedTuple):
    """Validated Adam hyperparameters for one update.

    Attributes:
        lr: Learning rate >= 0, a float or (torch) a 0-d tensor.
        step: 1-based number of the update being made.
        beta1: Decay of the first moment, in [0, 1).
        beta2: Decay of the second moment, in [0, 1).
        eps: Denominator floor, > 0.
    """

    lr: Any
    step: int
    beta1: float
    beta2: float
    eps: float


def framework_of(x: Any) -> str | None:
    """Names the framework whose array ``x`` is, or None if it is not an array."""
    # A torch tensor cannot exist unless torch was imported, so don't import it here.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    return None


def framework_name(f: Any) -> str:
    """Normalises a framework argument (``"torch"``, the ``torch`` module, ...) to its name.

    Args:
        f: A framework name or module.

    Returns:
        One of `NAMES`.

    Raises:
        ValueError: ``f`` names no known framework.
    """
    name = f.__name__ if isinstance(f, types.ModuleType) else f
    if name not in _MODULES:
        raise ValueError(
            f"f={f!r} is not a known framework: pass one of {', '.join(map(repr, NAMES))} "
            "(or the module itself), or f=None to infer it from the arrays"
        )
    return name


def get(name: str) -> types.ModuleType:
    """Returns the backend module for a framework name from `NAMES`."""
    return importlib.import_module(_MODULES[name])
