"""Callbacks: user code the driver calls as the run goes (built-in loggers: ``loggers``).

A callback is an object with any of the hooks below (subclass :class:`Callback` to get
the others as no-ops), or a plain callable, which is called as ``on_step_end(record)``.
The hooks run on the driver, in this order for one step: ``on_eval`` (on evaluation
steps), then ``on_step_end``; ``on_checkpoint`` when a checkpoint's manifest is written,
``on_failure`` for each recovered (or fatal) worker failure, ``on_fit_end`` once at the end.
A hook that raises stops the run with :class:`CallbackError`; checkpoints already written
stay as they are (each one is complete or was never listed).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from distopt.runtime.errors import TrainingError

HOOKS = ("on_step_end", "on_eval", "on_checkpoint", "on_failure", "on_fit_end")


class Callback:
    """Base class with every hook a no-op: override the ones you need."""

    def on_step_end(self, record: dict) -> None:
        """A step committed: its history entry (with ``eval_*`` keys on evaluation steps)."""

    def on_eval(self, record: dict) -> None:
        """An evaluation finished: ``step``, ``eval_loss``, ``eval_<metric>``, ``eval_samples``, ``eval_s``."""

    def on_checkpoint(self, record: dict) -> None:
        """A checkpoint is complete on disk: ``step`` and ``path``."""

    def on_failure(self, record: dict) -> None:
        """A worker failed: the record that ``FitResult.failures`` keeps."""

    def on_fit_end(self, result: Any) -> None:
        """``fit`` is done: its :class:`~distopt.runtime.trainer.FitResult`."""


class CallbackError(TrainingError):
    """A callback raised; the run stopped. ``__cause__`` is the callback's exception."""


class FunctionCallback(Callback):
    """A plain callable, called with every step's record."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def on_step_end(self, record: dict) -> None:
        self.fn(record)

    def __repr__(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


class Callbacks:
    """The run's callbacks, called in the order given."""

    def __init__(self, callbacks: Sequence[Any]) -> None:
        self.callbacks = list(callbacks)

    def fire(self, hook: str, arg: Any) -> None:
        """Call ``hook(arg)`` on every callback that has it.

        Raises:
            CallbackError: a callback raised; the message names it, the hook and the step.
        """
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is None:
                continue
            try:
                method(arg)
            except Exception as e:
                step = arg.get("step") if isinstance(arg, dict) else None
                where = f" at step {step}" if step is not None else ""
                raise CallbackError(f"callback {cb!r}.{hook}{where} raised {type(e).__name__}: {e}; the run "
                                    f"stopped there (checkpoints already written are intact): fix the "
                                    f"callback, or resume from the checkpoint") from e


def scalars(record: dict, skip: tuple[str, ...] = ("step", "committed_at")) -> dict[str, float]:
    """The finite numbers of a record, for loggers (booleans and text left out)."""
    return {k: float(v) for k, v in record.items() if k not in skip and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}
