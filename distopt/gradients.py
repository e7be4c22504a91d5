"""Gradient API (variables, autodiff and update rules) for torch and numpy arrays.

Names, arguments and defaults follow Ivy's ``ivy.core.gradients``. Every function
takes a *tree*: one array, or dicts/lists/tuples of arrays nested to any depth, and
returns results with the same containers. This module validates arguments, infers
the framework and flattens the trees; the math lives in `distopt.backends`.

The framework is inferred from the arrays when ``f`` is None, or named with
``f="torch"``/``"numpy"`` (or the modules themselves). One call uses one framework.
"""

from __future__ import annotations

import math
import types
from typing import Any, Callable, Sequence

from distopt import _nest, backends
from distopt.backends import AdamHyper

__all__ = ["adam_update", "execute_with_gradients", "gradient_descent_update", "is_variable",
           "stop_gradient", "variable"]

Framework = str | types.ModuleType | None
_TYPE_NAMES = {"torch": "torch.Tensor", "numpy": "numpy.ndarray"}
_ONE_FRAMEWORK_FIX = "convert with torch.from_numpy(x) or x.numpy() so every array uses one framework"


def _pick_framework(f: Framework, named: Sequence[tuple[str, list]], structure: Any,
                    default: str) -> tuple[str, str | None]:
    """Returns the framework name and, when inferred, the path of the leaf it came from."""
    if f is not None:
        return backends.framework_name(f), None
    for tree_name, leaves in named:
        if leaves:
            where = _nest.path_str(tree_name, _nest.leaf_paths(structure)[0])
            name = backends.framework_of(leaves[0])
            if name is None:
                raise _not_array(leaves[0], where)
            return name, where
    return default, None  # no leaves at all: nothing to compute, any backend will do


def _not_array(x: Any, where: str) -> TypeError:
    return TypeError(f"{where} is a {type(x).__name__}, not an array: pass a torch.Tensor or a numpy.ndarray")


def _check_leaves(backend: types.ModuleType, named: Sequence[tuple[str, list]], structure: Any,
                  origin: str | None, need_float: bool) -> None:
    """Checks in one pass that every leaf is an array of ``backend`` with a float dtype."""
    name = backend.NAME
    for tree_name, leaves in named:
        for i, x in enumerate(leaves):
            if isinstance(x, backend.ARRAY_TYPE) and (not need_float or backend.is_float(x)):
                continue
            where = _nest.path_str(tree_name, _nest.leaf_paths(structure)[i])
            other = backends.framework_of(x)
            if other is None:
                raise _not_array(x, where)
            if other != name:
                source = f"f={name!r}" if origin is None else f"{origin} is a {_TYPE_NAMES[name]}"
                raise TypeError(f"{where} is a {_TYPE_NAMES[other]} but {source}: {_ONE_FRAMEWORK_FIX}")
            raise TypeError(
                f"{where} has dtype {x.dtype}, but gradients and updates need floating-point "
                f"arrays: convert it with {backend.FLOAT_FIX}"
            )


def _backend_for(f: Framework, named: Sequence[tuple[str, list]], structure: Any, default: str,
                 need_float: bool | None) -> types.ModuleType:
    """Picks and returns the backend; ``need_float=None`` checks dtypes only where autodiff exists."""
    name, origin = _pick_framework(f, named, structure, default)
    backend = backends.get(name)
    need_float = backend.HAS_AUTODIFF if need_float is None else need_float
    _check_leaves(backend, named, structure, origin, need_float)
    return backend


def _check_lr(lr: Any) -> float:
    try:
        value = float(lr.detach() if backends.framework_of(lr) == "torch" else lr)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"lr={lr!r} is not a number: pass a float or a 0-d tensor") from None
    if value < 0:
        raise ValueError(f"lr={value} is negative: pass a learning rate >= 0")
    if not math.isfinite(value):
        raise ValueError(f"lr={value} is not finite: pass a finite learning rate >= 0")
    return value


def _plain_lr(lr: Any, value: float, inplace: bool) -> Any:
    # Out of place, keep a tensor lr: it may require grad, for d(loss)/d(lr).
    return lr if not inplace and backends.framework_of(lr) == "torch" else value


def _adam_hyper(lr: Any, step: Any, beta1: float, beta2: float, epsilon: float, inplace: bool) -> AdamHyper:
    """Validates the scalar arguments of `adam_update` before any array is looked at."""
    value = _check_lr(lr)
    for name, beta, default in (("beta1", beta1, 0.9), ("beta2", beta2, 0.999)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}={beta} is outside [0, 1): pass 0 <= {name} < 1 (default {default})")
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon} is not > 0: pass a small positive value such as 1e-8; "
                         "it keeps the update finite where vw is 0")
    try:
        step_value = float(step)
    except (TypeError, ValueError, RuntimeError):
        step_value = math.nan
    if not (step_value >= 1 and step_value.is_integer()):
        raise ValueError(f"step={step!r} is invalid: step is the 1-based number of the update being "
                         "made (the first call uses step=1), so pass an integer >= 1")
    lr = _plain_lr(lr, value, inplace)
    return AdamHyper(lr, int(step_value), float(beta1), float(beta2), float(epsilon))


def variable(x: Any, f: Framework = None) -> Any:
    """Makes arrays trainable: torch tensors get ``requires_grad=True``.

    A torch leaf tensor is marked in place and returned; a non-leaf tensor (one with
    history) is detached first, so the result is always a leaf. NumPy has no autodiff:
    numpy arrays are returned unchanged (and `is_variable` is False for them).

    Args:
        x: An array or a nested dict/list/tuple of arrays.
        f: ``"torch"``, ``"numpy"``, the module itself, or None to infer from ``x``.

    Returns:
        ``x``'s structure with each array made a variable.

    Raises:
        TypeError: A torch tensor is not floating point (use ``x.float()``), a leaf is
            not an array, or frameworks are mixed.
        ValueError: ``f`` is not a known framework.
    """
    leaves, structure = _nest.flatten(x)
    backend = _backend_for(f, [("x", leaves)], structure, "numpy", need_float=None)
    return _nest.unflatten(structure, backend.variable(leaves))


def is_variable(x: Any, f: Framework = None) -> Any:
    """Tells whether arrays track gradients (torch: ``requires_grad``; numpy: always False).

    Args:
        x: An array or a nested dict/list/tuple of arrays.
        f: ``"torch"``, ``"numpy"``, the module itself, or None to infer from ``x``.

    Returns:
        A bool for a single array, else ``x``'s structure with a bool per array.

    Raises:
        TypeError: A leaf is not an array, or frameworks are mixed.
        ValueError: ``f`` is not a known framework.
    """
    leaves, structure = _nest.flatten(x)
    backend = _backend_for(f, [("x", leaves)], structure, "numpy", need_float=False)
    return _nest.unflatten(structure, backend.is_variable(leaves))


def stop_gradient(x: Any, f: Framework = None) -> Any:
    """Cuts arrays out of the autodiff graph (torch: ``detach()``; numpy: identity).

    Args:
        x: An array or a nested dict/list/tuple of arrays.
        f: ``"torch"``, ``"numpy"``, the module itself, or None to infer from ``x``.

    Returns:
        ``x``'s structure with arrays that share memory but carry no gradient history.

    Raises:
        TypeError: A leaf is not an array, or frameworks are mixed.
        ValueError: ``f`` is not a known framework.
    """
    leaves, structure = _nest.flatten(x)
    backend = _backend_for(f, [("x", leaves)], structure, "numpy", need_float=False)
    return _nest.unflatten(structure, backend.stop_gradient(leaves))


def execute_with_gradients(func: Callable[[Any], Any], xs: Any, retain_grads: bool = False,
                           f: Framework = None) -> tuple[Any, ...]:
    """Calls ``func(xs)`` and returns its output with the gradients of ``y`` w.r.t. ``xs``.

    Inputs that do not require grad are replaced, before ``func`` sees them, by detached
    aliases that do, so plain tensors work. Inputs ``y`` does not depend on get zero
    gradients. With ``f="torch"``, numpy inputs are wrapped with ``torch.from_numpy``.

    Args:
        func: Takes a tree shaped like ``xs``; returns a scalar ``y`` or ``(y, *extras)``.
        xs: The inputs: an array or a nested dict/list/tuple of arrays.
        retain_grads: False: ``y`` and the grads come back detached and the graph is
            freed. True: the graph is kept (``create_graph=True``) and the grads are
            differentiable, for higher-order gradients.
        f: ``"torch"``, ``"numpy"``, the module itself, or None to infer from ``xs``.

    Returns:
        ``(y, grads, *extras)``, with ``grads`` shaped like ``xs``.

    Raises:
        TypeError: The inputs are numpy arrays (numpy has no autodiff), a tensor is not
            floating point, a leaf is not an array, or ``func`` returned no tensor.
        ValueError: ``y`` is not a scalar (reduce it with ``.sum()`` or ``.mean()``), or
            ``f`` is not a known framework.
    """
    leaves, structure = _nest.flatten(xs)
    if f is not None and backends.framework_name(f) == "torch":
        leaves = backends.get("torch").as_tensors(leaves)
    backend = _backend_for(f, [("xs", leaves)], structure, "torch", need_float=None)
    y, grads, extras = backend.execute_with_gradients(
        lambda flat: func(_nest.unflatten(structure, flat)), leaves, retain_grads
    )
    return (y, _nest.unflatten(structure, grads), *extras)


def gradient_descent_update(ws: Any, dcdws: Any, lr: Any, inplace: bool = True, f: Framework = None) -> Any:
    """One gradient-descent step: ``w_new = w - lr * dw`` for every array.

    Args:
        ws: Weights: an array or a nested dict/list/tuple of float arrays.
        dcdws: Gradients of the cost, with the same structure and shapes as ``ws``
            (a list may stand in for a tuple).
        lr: Learning rate >= 0: a float, or a 0-d tensor (which, with ``inplace=False``,
            may require grad).
        inplace: True: update ``ws``'s arrays in place (torch: one ``_foreach_add_``
            under ``no_grad``; numpy: ``out=``) and return ``ws`` itself. False: return
            new arrays in ``ws``'s containers; with torch the step is differentiable.
        f: ``"torch"``, ``"numpy"``, the module itself, or None to infer.

    Returns:
        The updated weights.

    Raises:
        ValueError: ``lr`` is negative, the trees differ in structure or shape (the
            message names the path), or ``f`` is unknown.
        TypeError: An array is not floating point, a leaf is not an array, or
            frameworks are mixed.
    """
    lr = _plain_lr(lr, _check_lr(lr), inplace)
    (w, g), structure = _nest.flatten_aligned([("ws", ws), ("dcdws", dcdws)])
    backend = _backend_for(f, [("ws", w), ("dcdws", g)], structure, "numpy", need_float=True)
    new_ws = backend.gradient_descent_update(w, g, lr, inplace)
    return ws if inplace else _nest.unflatten(structure, new_ws)


def _check_distinct(ms: list, vs: list, structure: Any) -> None:
    for i, (m, v) in enumerate(zip(ms, vs)):
        if m is v:  # in place, the second moment would overwrite the first
            path = _nest.leaf_paths(structure)[i]
            raise ValueError(f"{_nest.path_str('mw', path)} and {_nest.path_str('vw', path)} are the "
                             "same array: give each moment its own zero-initialised buffer")


def adam_update(ws: Any, dcdws: Any, lr: Any, mw: Any, vw: Any, step: int, beta1: float = 0.9,
                beta2: float = 0.999, epsilon: float = 1e-7, inplace: bool = True,
                f: Framework = None) -> tuple[Any, Any, Any]:
    """One Adam step (Kingma & Ba; identical to ``torch.optim.Adam`` without weight decay).

    For every array, with ``g = dw`` and ``t = step``::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        w = w - (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + epsilon)

    Torch, ``inplace=True``: one ``torch._fused_adam_`` call per (device, dtype) group,
    or ``torch._foreach_*`` ops where that kernel is missing (see `torch_backend`).
    Torch, ``inplace=False``: differentiable in ``ws``, ``dcdws``, ``mw``, ``vw`` and a
    tensor ``lr``, except where ``v`` is exactly 0 (``sqrt`` has no finite slope there).

    Args:
        ws: Weights: an array or a nested dict/list/tuple of float arrays.
        dcdws: Gradients, same structure and shapes as ``ws``.
        lr: Learning rate >= 0: a float or a 0-d tensor.
        mw: First moments (zeros before the first step), same structure as ``ws``.
        vw: Second moments (zeros before the first step), same structure as ``ws``.
        step: 1-based number of the update being made: 1 on the first call.
        beta1: Decay of the first moment, in [0, 1).
        beta2: Decay of the second moment, in [0, 1).
        epsilon: Added to the denominator, > 0. Ivy's default 1e-7; torch uses 1e-8.
        inplace: True: update ``ws``, ``mw`` and ``vw`` in place and return those same
            objects. False: leave them untouched and return new arrays in ``ws``'s
            containers.
        f: ``"torch"``, ``"numpy"``, the module itself, or None to infer.

    Returns:
        ``(ws_new, mw, vw)`` after the step.

    Raises:
        ValueError: A hyperparameter is out of range (the message gives the valid
            range), the trees differ in structure or shape (the message names the
            path), ``mw`` and ``vw`` share an array with ``inplace=True``, or ``f`` is
            unknown. Nothing is modified.
        TypeError: An array is not floating point, a leaf is not an array, or
            frameworks are mixed. Nothing is modified.
    """
    hp = _adam_hyper(lr, step, beta1, beta2, epsilon, inplace)
    names = ("ws", "dcdws", "mw", "vw")
    leaf_lists, structure = _nest.flatten_aligned(list(zip(names, (ws, dcdws, mw, vw))))
    backend = _backend_for(f, list(zip(names, leaf_lists)), structure, "numpy", need_float=True)
    if inplace:
        _check_distinct(leaf_lists[2], leaf_lists[3], structure)
    new_ws, new_mw, new_vw = backend.adam_update(*leaf_lists, hp, inplace)
    if inplace:
        return ws, mw, vw
    return tuple(_nest.unflatten(structure, leaves) for leaves in (new_ws, new_mw, new_vw))
