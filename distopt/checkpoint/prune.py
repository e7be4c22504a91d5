"""Retention: drop old checkpoints and the debris of interrupted writes.

Only the folder name and the manifest's presence are looked at (no hashing), so pruning is
cheap enough to run after every save. Call it from one process (rank 0, after its
manifest is written).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from distopt.checkpoint.format import MANIFEST, fsync_dir, is_temp, parse_step
from distopt.checkpoint.reader import list_checkpoints


def prune(root: str | os.PathLike, keep_last: int = 3) -> list[Path]:
    """Keep the ``keep_last`` newest complete checkpoints; remove older ones and leftovers.

    Removed: complete checkpoints beyond the newest ``keep_last``; incomplete folders and
    temporary files from steps older than the newest complete checkpoint. Never removed:
    the newest complete checkpoint, and anything at or after its step (a write may be in
    progress there). Completeness is the manifest's presence, not a verification: after
    :func:`latest_valid` skipped damaged checkpoints, remove those with
    :func:`remove_checkpoint` so they do not count here.

    Args:
        root: the checkpoint root.
        keep_last: complete checkpoints to keep, >= 1.

    Returns:
        The paths removed.

    Raises:
        ValueError: ``keep_last < 1``.
    """
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise ValueError(f"keep_last={keep_last!r} must be an int >= 1: the newest checkpoint is always kept")
    complete = list_checkpoints(root)
    if not complete:
        return []  # nothing is known complete: an in-progress first save is not debris
    newest = parse_step(complete[0].name)
    removed = []
    for path in complete[keep_last:]:
        remove_checkpoint(path)
        removed.append(path)
    removed += _clean_debris(Path(root), newest)
    fsync_dir(root)
    return removed


def _clean_debris(root: Path, newest: int) -> list[Path]:
    # Only below the newest complete step: at or above it a writer may still be busy.
    removed = []
    for entry in sorted(root.iterdir()):
        step = parse_step(entry.name)
        if step is None or step >= newest or not entry.is_dir():
            continue
        if not (entry / MANIFEST).exists():
            shutil.rmtree(entry)
            removed.append(entry)
            continue
        for leftover in [f for f in entry.iterdir() if is_temp(f.name)]:
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def remove_checkpoint(ckpt_dir: str | os.PathLike) -> None:
    """Delete one checkpoint folder, manifest first.

    With the manifest gone first, a crash midway leaves an incomplete folder (ignored by
    readers, cleaned by :func:`prune`) rather than a "complete" one missing files.
    """
    folder = Path(ckpt_dir)
    (folder / MANIFEST).unlink(missing_ok=True)
    fsync_dir(folder)
    shutil.rmtree(folder)
