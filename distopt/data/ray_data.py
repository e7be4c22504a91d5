"""A ``ray.data.Dataset`` as a stream, read on each worker through Ray Data's own iterator.

Ray is not imported here: the dataset object brings its methods with it. Its rows come in
the dataset's order (``preserve_order`` is set, so they do not depend on which block
finishes first), the same every epoch; shuffle it in the dataset itself (e.g.
``ds.random_shuffle(seed=0)``) if it should be shuffled.
"""
from __future__ import annotations

from typing import Any, Iterator


class RayDataStream:
    """Iterates a ``ray.data.Dataset``'s rows (dicts) in order."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict]:
        self.dataset.context.execution_options.preserve_order = True  # rows in order, whatever runs first
        return iter(self.dataset.iter_rows())
