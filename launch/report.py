"""What the example jobs print and keep at the end of a run (shared by ``run_gpt`` and ``demo``)."""
from __future__ import annotations

import json
import os
from typing import Any

ADAM_BYTES_PER_PARAM = 8  # two fp32 moments per parameter


def state_bytes_line(summary: dict, num_params: int, workers: int, zero_stage: int) -> str:
    """Optimizer state held per worker against an unsharded copy, from the run's summary."""
    per_worker = summary.get("state_bytes_per_worker")
    unsharded = summary.get("state_bytes_unsharded")
    note = ""
    if unsharded is None:
        unsharded = ADAM_BYTES_PER_PARAM * num_params
        note = f" (unsharded figure computed here: {ADAM_BYTES_PER_PARAM} B x {num_params:,} parameters)"
    if per_worker is None:
        return f"optimizer state   per worker not reported by the Trainer; unsharded {unsharded:,} B{note}"
    share = per_worker / unsharded if unsharded else float("nan")
    return (f"optimizer state   {per_worker:,} B per worker vs {unsharded:,} B unsharded "
            f"({share:.0%}; ZeRO-{zero_stage}, {workers} workers){note}")


def write_json(folder: str, name: str, figures: dict[str, Any]) -> str:
    """Write ``figures`` to ``folder/name`` (indented, newline-terminated); returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
        f.write("\n")
    return path
