"""NumPy backend: updates on flat lists of ndarrays. NumPy has no autodiff.

In-place updates write through ``out=`` so the caller's arrays are the ones changed.
Out-of-place results go through ``np.asarray`` because arithmetic on 0-d arrays
yields numpy scalars, which are not valid leaves.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from distopt.backends import AdamHyper

NAME = "numpy"
ARRAY_TYPE = np.ndarray
HAS_AUTODIFF = False
FLOAT_FIX = "x.astype(np.float32)"

NO_AUTODIFF = (
    "numpy has no autodiff, so execute_with_gradients cannot differentiate numpy arrays: "
    "pass torch tensors (e.g. torch.from_numpy(x)) or f='torch'"
)


def is_float(x: np.ndarray) -> bool:
    """Whether ``x`` has a real floating-point dtype."""
    return x.dtype.kind == "f"


def variable(xs: list[np.ndarray]) -> list[np.ndarray]:
    """Returns the arrays unchanged: numpy has no notion of a trainable variable."""
    return list(xs)


def is_variable(xs: list[np.ndarray]) -> list[bool]:
    """Always False: numpy arrays never track gradients."""
    return [False] * len(xs)


def stop_gradient(xs: list[np.ndarray]) -> list[np.ndarray]:
    """Identity: there is no graph to cut."""
    return list(xs)


def execute_with_gradients(func: Callable[[list[Any]], Any], xs: list[np.ndarray], retain_grads: bool) -> Any:
    """Always raises: numpy cannot compute gradients.

    Raises:
        TypeError: Always; the message says to pass torch tensors instead.
    """
    raise TypeError(NO_AUTODIFF)


def gradient_descent_update(
    ws: list[np.ndarray], dcdws: list[np.ndarray], lr: Any, inplace: bool
) -> list[np.ndarray]:
    """Computes ``w - lr * dw`` per leaf, writing into ``w`` when ``inplace``."""
    lr = float(lr)
    if not inplace:
        return [np.asarray(w - lr * g) for w, g in zip(ws, dcdws)]
    for w, g in zip(ws, dcdws):
        np.subtract(w, lr * g, out=w)
    return ws


def adam_update(
    ws: list[np.ndarray],
    dcdws: list[np.ndarray],
    mw: list[np.ndarray],
    vw: list[np.ndarray],
    hp: AdamHyper,
    inplace: bool,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """One Adam step per leaf; see `distopt.gradients.adam_update` for the formula.

    Args:
        ws, dcdws, mw, vw: Aligned flat lists of weights, gradients and moments.
        hp: Validated hyperparameters.
        inplace: Write into ``ws``, ``mw`` and ``vw`` instead of allocating.

    Returns:
        ``(ws, mw, vw)`` after the step.
    """
    beta1, beta2, eps = hp.beta1, hp.beta2, hp.eps
    step_size = float(hp.lr) / (1.0 - beta1**hp.step)
    bc2_sqrt = math.sqrt(1.0 - beta2**hp.step)
    if not inplace:
        ms = [np.asarray(beta1 * m + (1.0 - beta1) * g) for m, g in zip(mw, dcdws)]
        vs = [np.asarray(beta2 * v + (1.0 - beta2) * g * g) for v, g in zip(vw, dcdws)]
        new_ws = [np.asarray(w - step_size * m / (np.sqrt(v) / bc2_sqrt + eps))
                  for w, m, v in zip(ws, ms, vs)]
        return new_ws, ms, vs
    for w, g, m, v in zip(ws, dcdws, mw, vw):
        np.multiply(m, beta1, out=m)
        np.add(m, (1.0 - beta1) * g, out=m)
        np.multiply(v, beta2, out=v)
        np.add(v, (1.0 - beta2) * g * g, out=v)
        np.subtract(w, step_size * m / (np.sqrt(v) / bc2_sqrt + eps), out=w)
    return ws, mw, vw
