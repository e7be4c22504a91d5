"""PyTorch backend: autodiff and updates on flat lists of tensors.

In-place Adam takes a fast path built for the sharded optimizer, which calls it every
step on lists of flat fp32 shards: leaves are grouped by device and dtype, and each
group is updated by one ``torch._fused_adam_`` call (the kernel ``torch.optim.Adam``
uses with ``fused=True``), or by a handful of ``torch._foreach_*`` calls where the
fused kernel is unavailable. Out-of-place updates use plain differentiable tensor ops.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from distopt.backends import AdamHyper

NAME = "torch"
ARRAY_TYPE = torch.Tensor
HAS_AUTODIFF = True
FLOAT_FIX = "x.float()"

# (device type, dtype) pairs the fused kernel raised for; they take the foreach path
# from then on instead of paying for the exception every step.
_FUSED_UNSUPPORTED: set[tuple[str, torch.dtype]] = set()

_Group = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def is_float(x: torch.Tensor) -> bool:
    """Whether ``x`` has a real floating-point dtype."""
    return x.is_floating_point()


def as_tensors(xs: list[Any]) -> list[torch.Tensor]:
    """Wraps numpy leaves as tensors sharing their memory; tensors pass through."""
    return [x if isinstance(x, torch.Tensor) else torch.from_numpy(x) for x in xs]


def variable(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Marks leaf tensors as requiring grad (in place); detaches non-leaves first."""
    return [x.requires_grad_() if x.is_leaf else x.detach().requires_grad_() for x in xs]


def is_variable(xs: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor requires grad."""
    return [x.requires_grad for x in xs]


def stop_gradient(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Detaches each tensor from the graph (sharing memory)."""
    return [x.detach() for x in xs]


def _split_output(out: Any) -> tuple[torch.Tensor, tuple[Any, ...]]:
    y, extras = (out[0], tuple(out[1:])) if isinstance(out, tuple) and out else (out, ())
    if not isinstance(y, torch.Tensor):
        raise TypeError(
            f"func returned {type(y).__name__} as y: return a scalar torch.Tensor y, or a tuple (y, *extras)"
        )
    if y.numel() != 1:
        raise ValueError(
            f"func returned y with shape {tuple(y.shape)}: y must be a scalar (numel 1) to be "
            "differentiated; reduce it with y.sum() or y.mean()"
        )
    return y, extras


def execute_with_gradients(
    func: Callable[[list[torch.Tensor]], Any], xs: list[torch.Tensor], retain_grads: bool
) -> tuple[torch.Tensor, list[torch.Tensor], tuple[Any, ...]]:
    """Calls ``func(xs)`` and differentiates its scalar output with respect to ``xs``.

    Args:
        func: Takes the flat list of inputs, returns ``y`` or ``(y, *extras)``.
        xs: Inputs; those not requiring grad are replaced by detached aliases that do.
        retain_grads: Build the backward graph so the grads are differentiable.

    Returns:
        ``(y, grads, extras)``; ``grads[i]`` is zero where ``y`` does not depend on ``xs[i]``.

    Raises:
        TypeError: ``func`` did not return a tensor.
        ValueError: ``y`` is not a scalar.
    """
    xs = [x if x.requires_grad else x.detach().requires_grad_() for x in xs]
    with torch.enable_grad():
        y, extras = _split_output(func(xs))
    if xs and y.requires_grad:
        grads = list(
            torch.autograd.grad(y, xs, create_graph=retain_grads, allow_unused=True, materialize_grads=True)
        )
    else:  # y is constant in xs, and autograd.grad refuses outputs without a graph
        grads = [torch.zeros_like(x) for x in xs]
    if not retain_grads:
        y, grads = y.detach(), [g.detach() for g in grads]
    return y, grads, extras


def gradient_descent_update(
    ws: list[torch.Tensor], dcdws: list[torch.Tensor], lr: Any, inplace: bool
) -> list[torch.Tensor]:
    """Computes ``w - lr * dw`` per leaf: one foreach kernel in place, differentiable otherwise."""
    if not inplace:
        return [w - lr * g for w, g in zip(ws, dcdws)]
    if ws:  # foreach ops reject empty lists; a rank may own no shards
        with torch.no_grad():
            torch._foreach_add_(ws, dcdws, alpha=-float(lr))
    return ws


def _group(ws: list, gs: list, ms: list, vs: list) -> dict[tuple, _Group]:
    # The key holds every tensor's device and dtype: the fused kernel checks them one
    # param at a time, so a mixed group would be left half updated when it raises.
    groups: dict[tuple, _Group] = {}
    for w, g, m, v in zip(ws, gs, ms, vs):
        key = (w.device, w.dtype, g.device, g.dtype, m.device, m.dtype, v.device, v.dtype)
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([], [], [], [])
        group[0].append(w)
        group[1].append(g)
        group[2].append(m)
        group[3].append(v)
    return groups


def _fused_adam(key: tuple, group: _Group, hp: AdamHyper) -> bool:
    """Runs ``torch._fused_adam_`` on one group; returns False if the caller must fall back."""
    device, dtype = key[0], key[1]
    uniform = len(set(key[0::2])) == 1 and len(set(key[1::2])) == 1
    fused = getattr(torch, "_fused_adam_", None)
    if fused is None or not uniform or (device.type, dtype) in _FUSED_UNSUPPORTED:
        return False
    ws, gs, ms, vs = group
    # One float32 step tensor per param on the params' device (as torch.optim.Adam keeps
    # them); the kernel reads but does not increment them. One allocation, n views.
    steps = list(torch.full((len(ws),), float(hp.step), dtype=torch.float32, device=device).unbind())
    try:
        fused(ws, gs, ms, vs, [], steps, lr=float(hp.lr), beta1=hp.beta1, beta2=hp.beta2,
              weight_decay=0.0, eps=hp.eps, amsgrad=False, maximize=False)
    except (RuntimeError, NotImplementedError):
        # Unsupported device/dtype fails on the first param, before anything is written.
        _FUSED_UNSUPPORTED.add((device.type, dtype))
        return False
    return True


def _foreach_adam(group: _Group, hp: AdamHyper) -> None:
    ws, gs, ms, vs = group
    torch._foreach_mul_(ms, hp.beta1)
    torch._foreach_add_(ms, gs, alpha=1.0 - hp.beta1)
    torch._foreach_mul_(vs, hp.beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - hp.beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, math.sqrt(1.0 - hp.beta2**hp.step))
    torch._foreach_add_(denom, hp.eps)
    torch._foreach_addcdiv_(ws, ms, denom, value=-float(hp.lr) / (1.0 - hp.beta1**hp.step))


def _functional_adam(ws: list, gs: list, ms: list, vs: list, hp: AdamHyper) -> tuple[list, list, list]:
    b1, b2 = hp.beta1, hp.beta2
    step_size = hp.lr / (1.0 - b1**hp.step)  # stays a tensor when lr is one, so d/d(lr) works
    bc2_sqrt = math.sqrt(1.0 - b2**hp.step)
    new_ms = [b1 * m + (1.0 - b1) * g for m, g in zip(ms, gs)]
    new_vs = [b2 * v + (1.0 - b2) * g * g for v, g in zip(vs, gs)]
    new_ws = [w - step_size * m / (v.sqrt() / bc2_sqrt + hp.eps) for w, m, v in zip(ws, new_ms, new_vs)]
    return new_ws, new_ms, new_vs


def adam_update(
    ws: list[torch.Tensor],
    dcdws: list[torch.Tensor],
    mw: list[torch.Tensor],
    vw: list[torch.Tensor],
    hp: AdamHyper,
    inplace: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One Adam step per leaf; see `distopt.gradients.adam_update` for the formula.

    Args:
        ws, dcdws, mw, vw: Aligned flat lists of weights, gradients and moments.
        hp: Validated hyperparameters.
        inplace: Update ``ws``, ``mw``, ``vw`` in place (fused/foreach, no autograd)
            instead of returning new, differentiable tensors.

    Returns:
        ``(ws, mw, vw)`` after the step.
    """
    if not inplace:
        return _functional_adam(ws, dcdws, mw, vw, hp)
    with torch.no_grad():
        for key, group in _group(ws, dcdws, mw, vw).items():
            if not _fused_adam(key, group, hp):
                _foreach_adam(group, hp)
    return ws, mw, vw
