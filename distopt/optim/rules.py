"""Update rules: SGD (with momentum, Nesterov, weight decay), Adam/AdamW and Muon.

A rule is plain hyperparameters plus ``init(params) -> state`` and
``update(params, grads, state, step) -> state``, which is ``apply(prepare(grads))``:
``prepare`` folds L2 decay into the gradients the state sees, ``apply`` changes state and
parameters. The split lets a replica replay an update from the prepared gradients alone;
``update`` itself, the learning rate at a step and ``config()`` are shared
(:mod:`distopt.optim.rule_base`), and Muon lives in :mod:`distopt.optim.muon`. The
arithmetic is the gradient API's
(:func:`distopt.gradients.gradient_descent_update`, :func:`distopt.gradients.adam_update`),
composed with weight decay and momentum; nothing here repeats it. ``params`` are lists of
tensors (flat shards in the sharded optimizer) updated in place; ``step`` is the 1-based
number of the update being made. A rule with ``whole_matrices = True`` (Muon) is given whole
2-D tensors instead: the sharded optimizer gives each such matrix to one rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Union

import torch

from distopt.gradients import adam_update, gradient_descent_update
from distopt.optim.muon import Muon, MuonState, orthogonalize
from distopt.optim.rule_base import LR, UpdateRule, lr_at

__all__ = ["LR", "lr_at", "UpdateRule", "SGD", "SGDState", "Adam", "AdamState", "Muon", "MuonState", "orthogonalize",
           "Rule", "hyperparameters", "with_hyperparameters", "sgd", "adam", "muon", "check_rule", "clipped"]


class SGDState(NamedTuple):
    momentum_buffer: list  # empty without momentum: plain SGD keeps no state


class AdamState(NamedTuple):
    exp_avg: list
    exp_avg_sq: list


@dataclass(frozen=True)
class SGD(UpdateRule):
    """SGD as ``torch.optim.SGD`` (no dampening): decay, then momentum, then the step."""

    lr: LR
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    name = "sgd"
    whole_matrices = False

    def init(self, params: list[torch.Tensor]) -> SGDState:
        """Zero momentum buffers shaped like ``params`` (none without momentum)."""
        return SGDState([torch.zeros_like(p) for p in params] if self.momentum else [])

    def prepare(self, params: list[torch.Tensor], grads: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """The gradients the state update sees: ``grads`` plus L2 decay (new tensors if any)."""
        return torch._foreach_add(grads, params, alpha=self.weight_decay) if self.weight_decay else grads

    def apply(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: SGDState, step: int) -> SGDState:
        """Momentum and the descent step from prepared gradients, in place."""
        lr = lr_at(self.lr, step)
        if not self.momentum:
            gradient_descent_update(params, grads, lr, inplace=True, f="torch")
            return state
        buf = state.momentum_buffer
        if _fusable(params, grads, buf):
            # One pass over parameters, gradients and buffers, as torch.optim.SGD(fused=True).
            with torch.no_grad():
                torch._fused_sgd_(params, grads, buf, weight_decay=0.0, momentum=self.momentum, lr=lr,
                                  dampening=0.0, nesterov=self.nesterov, maximize=False, is_first_step=False)
            return state
        # With zero-initialised buffers the first step gives buf == grad, as torch's clone does.
        torch._foreach_mul_(buf, self.momentum)
        torch._foreach_add_(buf, grads)
        grads = torch._foreach_add(grads, buf, alpha=self.momentum) if self.nesterov else buf
        gradient_descent_update(params, grads, lr, inplace=True, f="torch")
        return state


@dataclass(frozen=True)
class Adam(UpdateRule):
    """Adam as ``torch.optim.Adam``; ``decoupled=True`` is AdamW (``torch.optim.AdamW``)."""

    lr: LR
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    name = "adam"
    whole_matrices = False

    def init(self, params: list[torch.Tensor]) -> AdamState:
        """Zero first and second moments shaped like ``params``."""
        return AdamState([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])

    def prepare(self, params: list[torch.Tensor], grads: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """The gradients the moments see: ``grads`` plus L2 decay unless decay is decoupled."""
        if self.weight_decay and not self.decoupled:
            return torch._foreach_add(grads, params, alpha=self.weight_decay)
        return grads

    def apply(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: AdamState, step: int) -> AdamState:
        """Decoupled decay and the Adam step from prepared gradients, in place."""
        lr = lr_at(self.lr, step)
        if self.weight_decay and self.decoupled:
            torch._foreach_mul_(params, 1.0 - lr * self.weight_decay)
        adam_update(params, grads, lr, state.exp_avg, state.exp_avg_sq, step,
                    beta1=self.betas[0], beta2=self.betas[1], epsilon=self.eps, inplace=True, f="torch")
        return state



Rule = Union[SGD, Adam, Muon]


def hyperparameters(rule: Rule) -> dict:
    """The rule's hyperparameters by name: the defaults of a torch-style parameter group."""
    return {f.name: getattr(rule, f.name) for f in fields(rule)}


def with_hyperparameters(rule: Rule, group: dict, where: str = "param group") -> Rule:
    """``rule`` with the hyperparameters a parameter group holds now, checked as the rule's
    constructor checks them (the rule itself when nothing differs).

    Raises:
        ValueError: a value the rule does not take, naming the group.
    """
    values = {name: group.get(name, default) for name, default in hyperparameters(rule).items()}
    if all(values[k] is getattr(rule, k) or values[k] == getattr(rule, k) for k in values):
        return rule
    try:
        return _FACTORIES[rule.name](**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def sgd(lr: LR, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> SGD:
    """SGD with optional momentum, Nesterov momentum and L2 weight decay.

    Raises:
        ValueError: a negative lr, momentum or weight decay, or nesterov without momentum.
    """
    _check_lr(lr)
    _check_nonneg(momentum=momentum, weight_decay=weight_decay)
    if nesterov and momentum <= 0:
        raise ValueError("nesterov=True needs momentum > 0: pass e.g. momentum=0.9")
    return SGD(lr, float(momentum), bool(nesterov), float(weight_decay))


def adam(lr: LR, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, decoupled: bool = False) -> Adam:
    """Adam; with ``decoupled=True`` the weight decay is AdamW's (``w *= 1 - lr * wd``).

    Raises:
        ValueError: a negative lr or weight decay, betas outside [0, 1), eps <= 0.
    """
    _check_lr(lr)
    _check_nonneg(weight_decay=weight_decay)
    if len(betas) != 2:
        raise ValueError(f"betas={betas!r} must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}]={b!r} is outside [0, 1): use e.g. betas=(0.9, 0.999)")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0: use e.g. eps=1e-8")
    return Adam(lr, (float(betas[0]), float(betas[1])), float(eps), float(weight_decay), bool(decoupled))


def muon(lr: LR, weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
         ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315), eps: float = 1e-7,
         adjust_lr_fn: str | None = None) -> Muon:
    """Muon for 2-D weight matrices (``torch.optim.Muon``'s arguments and updates); give the
    other tensors (embeddings, head, biases, norms) AdamW through parameter groups.

    Raises:
        ValueError: negative hyperparameters, ``ns_steps`` outside [1, 99], coefficients that
            are not three numbers, ``eps <= 0``, or an unknown ``adjust_lr_fn``.
    """
    _check_lr(lr)
    _check_nonneg(weight_decay=weight_decay, momentum=momentum)
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
        raise ValueError(f"ns_steps={ns_steps!r} must be an int in [1, 99] (5 is the usual)")
    coefficients = tuple(ns_coefficients)
    if len(coefficients) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in coefficients):
        raise ValueError(f"ns_coefficients={ns_coefficients!r} must be three finite numbers (a, b, c)")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0: use e.g. eps=1e-7")
    if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
        raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} must be None, 'original' or 'match_rms_adamw'")
    return Muon(lr, float(weight_decay), float(momentum), bool(nesterov), ns_steps,
                tuple(float(v) for v in coefficients), float(eps), adjust_lr_fn)


_FACTORIES = {"sgd": sgd, "adam": adam, "muon": muon}


def _fusable(*lists: list[torch.Tensor]) -> bool:
    """Whether torch's fused SGD kernel takes these: one device (CPU or CUDA), one float dtype."""
    tensors = [t for ts in lists for t in ts]
    return (hasattr(torch, "_fused_sgd_") and len({(t.device, t.dtype) for t in tensors}) == 1
            and tensors[0].device.type in ("cpu", "cuda") and tensors[0].dtype in (torch.float32, torch.float64))


def check_rule(rule: object, name: str = "optimizer") -> None:
    """Raise TypeError unless ``rule`` is an update rule (the argument is called ``name``)."""
    if not all(hasattr(rule, m) for m in ("init", "update", "config")):
        raise TypeError(f"{name}={rule!r} is not an update rule: use distopt.optim.adam(lr=...), "
                        f"distopt.optim.sgd(lr=...) or distopt.optim.muon(lr=...)")


def _check_lr(lr: LR) -> None:
    if callable(lr):
        return
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr={lr!r} must be a finite float >= 0 or a schedule step -> lr")


def _check_nonneg(**values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{name}={v!r} must be >= 0")


def clipped(grads: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """``grads`` times the clipping factor, as new tensors (the reduced shard stays as it
    is: a replica's holder may replay from it)."""
    return grads if scale == 1.0 else torch._foreach_mul(grads, scale)
