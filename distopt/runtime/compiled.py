"""``Trainer(compile=True)``: each worker's model goes through ``torch.compile``.

The model is compiled in place (``nn.Module.compile``), so its parameters, their names and
its ``state_dict`` keys stay the model's own: the optimizer's gradient hooks sit on the
same leaf tensors, and checkpoints and exported weights read as from an eager run.
Autograd still accumulates every gradient into its leaf, so the post-accumulate hooks
that start the bucket reductions during backward fire as they do in eager mode.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class CompiledFactory:
    """A picklable model factory: ``factory()``, then ``torch.compile`` on the module it returns.

    Args:
        factory: the user's zero-arg model factory.
        options: keyword arguments of ``torch.compile`` (``mode``, ``backend``, ...).
    """

    def __init__(self, factory: Callable[[], Any], **options: Any) -> None:
        self.factory, self.options = factory, options

    def __call__(self) -> Any:
        model = self.factory()
        if isinstance(model, torch.nn.Module):  # anything else: the worker's own check names it
            model.compile(**self.options)
        return model

    def __repr__(self) -> str:
        return f"CompiledFactory({self.factory!r})"
