"""``Trainer(param_groups=fn)``: the user's groups for a model, checked and named.

``fn(model)`` returns torch-style groups (dicts with ``"params"``, and overrides such as
``"lr"``, ``"weight_decay"`` or ``"rule"``). Every group's tensors are renamed to the model's
own parameter names, so checkpoints and errors speak of ``"blocks.0.attn.weight"``, not of
positions. Every trainable parameter must be in exactly one group: one left out is refused,
not frozen silently (freeze it with ``requires_grad_(False)`` in the model instead).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from distopt.optim.params import normalize
from distopt.optim.rules import Rule


def model_groups(fn: Callable[[torch.nn.Module], Any], model: torch.nn.Module) -> list[dict]:
    """``fn(model)`` checked, with each tensor as a ``(model name, tensor)`` pair.

    Raises:
        TypeError: ``fn`` returns something other than a list of dicts with ``"params"``.
        ValueError: a tensor that is not one of the model's trainable parameters, a parameter
            in two groups, or a trainable parameter in none.
    """
    where = f"param_groups={getattr(fn, '__qualname__', fn)!r}"
    groups = fn(model)
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) and "params" in g for g in groups):
        raise TypeError(f"{where} returned {type(groups).__name__}: it must return a list of dicts, each with "
                        f"'params' (e.g. distopt.optim.decay_groups(model))")
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    placed: dict[str, int] = {}
    out = []
    for g, group in enumerate(groups):
        pairs = []
        for t in _tensors(group["params"]):
            if id(t) not in names:
                raise ValueError(f"{where}: group {g} holds a tensor of shape {tuple(getattr(t, 'shape', ()))} that "
                                 f"is not a trainable parameter of the model: return model.parameters() only")
            name = names[id(t)]
            if name in placed and placed[name] != g:
                raise ValueError(f"{where}: parameter {name!r} is in group {placed[name]} and group {g}: put each "
                                 f"parameter in one group")
            placed[name] = g
            pairs.append((name, t))
        out.append({**{k: v for k, v in group.items() if k not in ("params", "param_names")}, "params": pairs})
    missing = [n for n in names.values() if n not in placed]
    if missing:
        raise ValueError(f"{where}: trainable parameters {missing[:5]} are in no group: add them to a group, or "
                         f"freeze them in the model with requires_grad_(False)")
    return out


def _tensors(params: Any) -> list[Any]:
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, Mapping):
        return list(params.values())
    return [x[1] if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) else x for x in params]


def check_resume(saved: list | None, fn: Callable[[torch.nn.Module], Any] | None, model_fn: Callable[[], Any],
                 rule: Rule) -> None:
    """Refuse, before any worker starts, to resume a checkpoint whose groups (``saved``, from
    its manifest) differ in count, rule or parameters from this run's (built on the meta
    device; a model that cannot be is checked by the workers as they load).

    Raises:
        ValueError: naming the first group and field that differ.
    """
    model = _meta_model(model_fn)
    if saved is None or model is None:
        return
    groups, _ = normalize(model_groups(fn, model) if fn is not None else list(model.named_parameters()), rule)
    mine = [{"rule_name": (g.get("rule") or rule).name, "param_names": list(g["param_names"])} for g in groups]
    if len(saved) != len(mine):
        raise ValueError(f"resume_from: the checkpoint has {len(saved)} parameter groups, this run has {len(mine)}: "
                         f"resume with the param_groups and optimizer it was written with")
    for g, (then, now) in enumerate(zip(saved, mine)):
        for key, value in now.items():
            if then.get(key, value) != value:
                raise ValueError(f"resume_from: parameter group {g} has {key}={then[key]!r} in the checkpoint and "
                                 f"{value!r} in this run: resume with the param_groups and optimizer it was "
                                 f"written with")


def _meta_model(model_fn: Callable[[], Any]) -> torch.nn.Module | None:
    try:
        with torch.device("meta"):
            model = model_fn()
    except Exception:  # (a model whose constructor needs real data: the workers check it)
        return None
    return model if isinstance(model, torch.nn.Module) else None


def check_on_meta(fn: Callable[[torch.nn.Module], Any], model_fn: Callable[[], Any], rule: Rule) -> None:
    """Run :func:`model_groups`, and the optimizer's own checks of the groups (keys, rules,
    Muon's 2-D tensors), on the driver against a model built on the meta device (no memory,
    no data), so a bad ``param_groups`` fails before any worker starts. A model that cannot
    be built on the meta device is checked by the workers instead."""
    model = _meta_model(model_fn)
    if model is not None:
        normalize(model_groups(fn, model), rule)
