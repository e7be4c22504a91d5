"""Muon: the (Nesterov) momentum of each whole 2-D matrix, orthogonalised by Newton-Schulz
iterations, as ``torch.optim.Muon``; built and checked by :func:`distopt.optim.rules.muon`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from distopt.optim.rule_base import LR, UpdateRule, lr_at


class MuonState(NamedTuple):
    momentum_buffer: list


@dataclass(frozen=True)
class Muon(UpdateRule):
    """Muon as ``torch.optim.Muon``: momentum, Newton-Schulz orthogonalisation of the
    (Nesterov) momentum in bfloat16, decoupled weight decay, and a step scaled by the shape."""

    lr: LR
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315)
    eps: float = 1e-7
    adjust_lr_fn: str | None = None
    name = "muon"
    whole_matrices = True

    def init(self, params: list[torch.Tensor]) -> MuonState:
        """Zero momentum buffers shaped like ``params``."""
        return MuonState([torch.zeros_like(p) for p in params])

    def prepare(self, params: list[torch.Tensor], grads: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """Muon's decay is decoupled: the state sees the gradients as they are."""
        return grads

    def apply(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: MuonState, step: int) -> MuonState:
        """Momentum, orthogonalisation, decay and the step, matrix by matrix, in place."""
        lr = lr_at(self.lr, step)
        for p, g, buf in zip(params, grads, state.momentum_buffer):
            if p.ndim != 2:
                raise ValueError(f"muon updates 2-D matrices only, got a tensor of shape {tuple(p.shape)}")
            buf.lerp_(g, 1.0 - self.momentum)
            direction = g.lerp(buf, self.momentum) if self.nesterov else buf
            ortho = orthogonalize(direction, self.ns_coefficients, self.ns_steps, self.eps)
            p.mul_(1.0 - lr * self.weight_decay)
            p.add_(ortho, alpha=-lr * _shape_factor(self.adjust_lr_fn, p.shape))
        return state


def orthogonalize(m: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """An approximately orthogonal matrix with ``m``'s singular vectors: ``steps`` quintic
    Newton-Schulz iterations ``x <- a x + (b A + c A^2) x`` with ``A = x x^T``, in bfloat16
    (as ``torch.optim.Muon``), on the wide orientation so ``A`` is the smaller Gram matrix."""
    a, b, c = coefficients
    tall = m.size(0) > m.size(1)
    x = m.bfloat16()
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def _shape_factor(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    # Keeps the update's RMS comparable across rectangular shapes (torch.optim.Muon's choices).
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))  # "match_rms_adamw"
