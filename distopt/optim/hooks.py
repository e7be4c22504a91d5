"""The points of a :class:`~distopt.optim.ShardedOptimizer` step that another layer may watch.

Fault tolerance (:mod:`distopt.ft`), fault injection and checkpoint writers register a
:class:`StepHooks` with ``opt.register_hooks(h)`` instead of reaching into the optimizer.
Every method is called on every rank at the same point of the same step, in the order
the hooks were registered; a hook that raises aborts the step (the caller treats it as a
failed step and rolls back).
"""
from __future__ import annotations


class StepHooks:
    """No-op base: override the points you need. ``step`` is the 1-based update in flight."""

    def phase(self, name: str, step: int) -> None:
        """Entering ``"grad_collective"``, ``"shard_update"`` or ``"param_gather"``."""

    def grads_reduced(self, step: int) -> None:
        """The averaged gradient shards of ``step`` are in ``opt.grad_shards``; before the
        gradient-norm allreduce, so before anything changes this rank's shard."""

    def before_update(self, step: int, scale: float) -> None:
        """Just before this rank's shard takes update ``step``, with clipping factor ``scale``."""

    def after_update(self, step: int) -> None:
        """This rank's shard holds update ``step`` (the other shards are not gathered yet)."""

    def after_gather(self, step: int) -> None:
        """Every rank's parameters hold update ``step``; ``opt.step_count == step``."""

    def before_load(self, full: bool) -> None:
        """A state dict is about to be loaded (a full one, or this rank's shard): raise to
        refuse it, before anything changes."""

    def after_load(self, full_state: dict | None) -> None:
        """A state dict was loaded: the full one (any world size wrote it), or None for a
        shard state dict."""

    def before_write(self) -> None:
        """This rank's parameter shard or state is about to change in place (an update, a
        load, a rollback): whoever still reads that memory must let go first."""
