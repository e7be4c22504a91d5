"""Evaluation during training: which batches each rank evaluates, and the exact average.

The held-out set is cut into fixed batches of ``eval_batch_size`` samples (the last one
may be shorter); batch ``i`` goes to rank ``i mod world_size``. Each rank returns, per
batch, its sample count and the eval function's values (means over the batch). The
driver sums ``value * samples`` over the batches in batch order and divides by the sample
count: the mean over the whole set, with the same bits for any worker count (the
batches, and so every per-batch value, do not depend on it).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalReport:
    """One rank's evaluation: ``batches`` holds ``(batch index, samples, {name: mean value})``."""

    rank: int
    step: int  # committed steps when it ran
    batches: list = field(default_factory=list)
    time_s: float = 0.0


def eval_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """Rank ``rank``'s batches of an ``n``-sample set: ``(index, start, end)`` each."""
    count = -(-n // batch_size)
    return [(i, i * batch_size, min(n, (i + 1) * batch_size)) for i in range(rank, count, world_size)]


def combine(step: int, reports: list[EvalReport], wall_s: float) -> dict:
    """The evaluation record: ``eval_<name>`` sample-weighted means, ``eval_samples``, ``eval_s``.

    Raises:
        ValueError: the eval function returned different metric names for different batches.
    """
    batches = sorted((b for r in reports for b in r.batches), key=lambda b: b[0])
    names = list(batches[0][2])
    for index, _, values in batches:
        if list(values) != names:
            raise ValueError(f"evaluation batch {index} returned metrics {sorted(values)}, batch 0 {sorted(names)}: "
                             f"the eval function must return the same metrics for every batch")
    total = sum(b[1] for b in batches)
    record = {"step": step}
    for name in names:
        weighted = 0.0
        for _, samples, values in batches:  # in batch order: the same sum for any worker count
            weighted += values[name] * samples
        record[f"eval_{name}"] = weighted / total
    record.update(eval_samples=total, eval_s=wall_s)
    return record
