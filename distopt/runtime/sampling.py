"""The map-style sampling contract now lives in :mod:`distopt.data.sampling` (kept importable here)."""
from distopt.data.sampling import global_indices, micro_batches, rank_indices, steps_per_epoch

__all__ = ["steps_per_epoch", "global_indices", "rank_indices", "micro_batches"]
