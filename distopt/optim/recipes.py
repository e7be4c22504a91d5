"""Parameter groups for the usual recipes, as functions of a model (``Trainer(param_groups=...)``).

Each returns torch-style groups of ``(name, tensor)`` pairs, so names survive into the
optimizer, its checkpoints and its errors. Every trainable parameter is in exactly one group.
"""
from __future__ import annotations

import torch

from distopt.optim.rules import Muon, muon


def decay_groups(model: torch.nn.Module, weight_decay: float | None = None) -> list[dict]:
    """AdamW's usual split: tensors with ``ndim >= 2`` (matrices, embeddings) decayed, the rest
    (biases, norm weights) not.

    Args:
        model: the module whose trainable parameters are split.
        weight_decay: the decayed group's decay; None keeps the rule's own.

    Returns:
        ``[{"params": decayed, ...}, {"params": the rest, "weight_decay": 0.0}]``, empty groups left out.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = {"params": [(n, p) for n, p in named if p.ndim >= 2]}
    if weight_decay is not None:
        decayed["weight_decay"] = float(weight_decay)
    rest = {"params": [(n, p) for n, p in named if p.ndim < 2], "weight_decay": 0.0}
    return [g for g in (decayed, rest) if g["params"]]


def hidden_matrices(model: torch.nn.Module) -> list[str]:
    """Names of the hidden weight matrices: 2-D weights of ``nn.Linear`` layers, except the
    last one (the head) and any weight shared with an ``nn.Embedding`` (tied embeddings)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = [m.weight for _, m in linears[:-1] if m.weight.requires_grad and id(m.weight) not in embedded]
    return [names[id(w)] for w in hidden if id(w) in names]


def muon_groups(model: torch.nn.Module, rule: Muon | None = None, weight_decay: float | None = None) -> list[dict]:
    """Muon for the hidden matrices (:func:`hidden_matrices`), the optimizer's own rule (AdamW)
    for embeddings, the head, biases and norms, split as :func:`decay_groups`: nanochat's and
    modded-nanogpt's recipe.

    Args:
        model: the module whose trainable parameters are split.
        rule: the hidden matrices' rule; default ``muon(lr=0.02)``.
        weight_decay: the decayed AdamW group's decay; None keeps the rule's own.
    """
    rule = rule if rule is not None else muon(lr=0.02)
    hidden = set(hidden_matrices(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rest = {"params": [(n, p) for n, p in named if n not in hidden and p.ndim >= 2]}
    if weight_decay is not None:
        rest["weight_decay"] = float(weight_decay)
    groups = [{"params": [(n, p) for n, p in named if n in hidden], "rule": rule}, rest,
              {"params": [(n, p) for n, p in named if n not in hidden and p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
