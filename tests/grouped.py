"""Test helper: Trainer keyword arguments written flat (``num_workers=2, log_every=0``)
sorted into the config groups the Trainer takes (``scaling=ScalingConfig(...)``, ...)."""
from __future__ import annotations

import dataclasses

from distopt.runtime.groups import GROUPS

_RENAMED = {"checkpoint_dir": ("checkpoint", "dir"), "checkpoint_every": ("checkpoint", "every"),
            "num_cpus_per_worker": ("scaling", "cpus_per_worker")}


def grouped(**kw) -> dict:
    """``kw`` with every config-group field moved into its group (other keys stay top level)."""
    fields = {f.name: table for table, cls in GROUPS.items() for f in dataclasses.fields(cls)}
    groups: dict[str, dict] = {}
    out = {}
    for key, value in kw.items():
        table, name = _RENAMED.get(key, (fields.get(key), key))
        if table is None:
            out[key] = value
        else:
            groups.setdefault(table, {})[name] = value
    return {**out, **{table: GROUPS[table](**values) for table, values in groups.items()}}
