"""Reading a checkpoint: find the complete ones, check every byte before trusting it.

Nothing here unpickles or evaluates anything: the manifest is msgpack (plain data) and
tensor files are raw bytes whose dtype, shape, offsets and sha256 come from the manifest.
Every check failure is a :class:`CheckpointError` naming the file, what is wrong and the
fix (use another checkpoint); :func:`latest_valid` applies that fix.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from distopt.checkpoint.format import (
    MANIFEST, CheckpointError, damaged, digest_of_digests, parse_step, sha256_hex, tensor_from_bytes,
)
from distopt.checkpoint.manifest import check_file_record, unpack_manifest
from distopt.checkpoint.reshard import full_state_from_shards, weights_from_shards

PathLike = str | os.PathLike
_MAX_MANIFEST_BYTES = 1 << 30  # far above any real manifest; refuses to slurp a stray huge file
_CHUNK = 1 << 23


class Checkpoint(NamedTuple):
    """A checkpoint read whole by :func:`load_checkpoint`."""

    path: Path
    manifest: dict
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict  # full state dict, for ShardedOptimizer.load_full_state_dict


def list_checkpoints(root: PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (folders ``step-N`` holding a manifest), newest first.

    Completeness is the manifest's presence; use :func:`verify` or :func:`latest_valid` to
    check contents. A missing ``root`` has none.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step, entry) for entry in root.iterdir()
             if (step := parse_step(entry.name)) is not None and (entry / MANIFEST).is_file()]
    return [path for _, path in sorted(found, reverse=True)]


def load_manifest(ckpt_dir: PathLike) -> dict:
    """Read and check a checkpoint's manifest (msgpack only: nothing is executed).

    Returns:
        The manifest (keys in :mod:`distopt.checkpoint.manifest`).

    Raises:
        CheckpointError: missing (incomplete checkpoint), not msgpack (a pickle, say), wrong
            keys or format version, damaged, or filed under another step's folder.
    """
    path = Path(ckpt_dir) / MANIFEST
    try:
        size = path.stat().st_size
        if size > _MAX_MANIFEST_BYTES:
            raise damaged(path, f"is {size} bytes, far more than any manifest")
        data = path.read_bytes()
    except FileNotFoundError:
        raise damaged(path, "does not exist: the checkpoint is incomplete (its writer stopped early)") from None
    except OSError as e:
        raise damaged(path, f"cannot be read ({e})") from None
    manifest = unpack_manifest(data, str(path))
    folder_step = parse_step(Path(ckpt_dir).name)
    if folder_step is not None and folder_step != manifest["step"]:
        raise damaged(path, f"is for step {manifest['step']} but sits in the folder of step {folder_step}")
    return manifest


def read_tensors(ckpt_dir: PathLike, file_record: dict, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors from one file of a checkpoint, checking before using any byte.

    The file's size is checked first, then each returned tensor's sha256 (and for a v1 file
    the whole file's sha256).

    Args:
        ckpt_dir: the checkpoint folder.
        file_record: the file's record from the manifest (``manifest["model"]``,
            ``manifest["shards"][rank]``).
        names: tensors to return (default: all of them).

    Returns:
        name -> CPU tensor, in the file's order.

    Raises:
        CheckpointError: the record is malformed, or the file is missing, truncated,
            extended or altered (named, with the fix).
        KeyError: ``names`` asks for a tensor the file does not hold.
    """
    folder = Path(ckpt_dir)
    try:
        check_file_record(file_record, "file record")
    except ValueError as e:
        raise damaged(folder, f"has a malformed file record ({e})") from None
    held = [t["name"] for t in file_record["tensors"]]
    unknown = sorted(set(names or ()) - set(held))
    if unknown:
        raise KeyError(f"{folder / file_record['file']} holds no tensors {unknown}; it holds {held}")
    path = folder / file_record["file"]
    data = memoryview(_read_checked(path, file_record))
    out = {}
    for t in file_record["tensors"]:
        if names is not None and t["name"] not in names:
            continue
        piece = data[t["offset"]: t["offset"] + t["nbytes"]]
        _check_piece(path, t, sha256_hex(piece))
        out[t["name"]] = tensor_from_bytes(piece, t["dtype"], t["shape"])
    return out


def _check_piece(path: Path, t: dict, digest: str) -> None:
    if digest != t["sha256"]:
        raise damaged(path, f"tensor {t['name']!r} (bytes {t['offset']}..{t['offset'] + t['nbytes']}) does not "
                            f"match its sha256 (flipped bits or a partial overwrite)")


def read_shards(ckpt_dir: PathLike, manifest: dict) -> dict[int, dict[str, torch.Tensor]]:
    """Every shard rank's file: rank -> field -> flat tensor (state fields and, from v2 on,
    ``"param"``, the rank's slice of the parameters), for reshard.

    Raises:
        CheckpointError: as :func:`read_tensors`.
    """
    return {rank: read_tensors(ckpt_dir, record) for rank, record in enumerate(manifest["shards"])}


def verify(ckpt_dir: PathLike) -> dict:
    """Check a checkpoint completely: its manifest, and every file's size and checksums.

    Files are hashed in chunks, so memory stays small whatever their size.

    Returns:
        The manifest.

    Raises:
        CheckpointError: the first problem found, naming the file.
    """
    manifest = load_manifest(ckpt_dir)
    for record in [manifest["model"], *manifest["shards"]]:
        path = Path(ckpt_dir) / record["file"]
        _check_size(path, record["size"])
        try:
            with open(path, "rb") as f:
                if "sha256" in record:  # v1: one digest of the whole file
                    if _hash_next(f, record["size"]) != record["sha256"]:
                        raise damaged(path, "does not match its sha256 (flipped bits or a partial overwrite)")
                else:  # v2: the tensors tile the file, in order
                    for t in record["tensors"]:
                        _check_piece(path, t, _hash_next(f, t["nbytes"]))
                    _check_digests(path, record)
        except OSError as e:
            raise damaged(path, f"cannot be read ({e})") from None
    return manifest


def _hash_next(f, nbytes: int) -> str:
    """Hex sha256 of the next ``nbytes`` of ``f`` (fewer at its end), read in chunks."""
    digest = hashlib.sha256()
    while nbytes and (chunk := f.read(min(_CHUNK, nbytes))):
        digest.update(chunk)
        nbytes -= len(chunk)
    return digest.hexdigest()


def latest_valid(root: PathLike) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` that verifies, skipping damaged newer ones.

    Each skipped checkpoint is reported with ``warnings.warn`` (folder and reason).

    Returns:
        ``(path, skipped)`` with ``skipped`` the ``(path, reason)`` of newer damaged ones.

    Raises:
        CheckpointError: no complete checkpoint under ``root`` verifies.
    """
    skipped: list[tuple[Path, str]] = []
    for path in list_checkpoints(root):
        try:
            verify(path)
            return path, skipped
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint {path}: {e}", RuntimeWarning, stacklevel=2)
            skipped.append((path, str(e)))
    reasons = "; ".join(f"{p.name}: {r}" for p, r in skipped) or "none is complete"
    raise CheckpointError(f"no usable checkpoint under {root} ({reasons}). Fix: start from step 0, or restore a "
                          f"checkpoint folder from a copy")


def load_checkpoint(ckpt_dir: PathLike) -> Checkpoint:
    """Read a whole checkpoint: manifest, weights, and the optimizer state as a full state dict.

    The full state dict loads on any world size and stage through
    ``ShardedOptimizer.load_full_state_dict``. Memory: the whole model and state.

    Raises:
        CheckpointError: anything missing or damaged.
    """
    manifest = load_manifest(ckpt_dir)
    shards = read_shards(ckpt_dir, manifest)
    model = weights_from_shards(manifest, shards, read_tensors(ckpt_dir, manifest["model"]))
    optimizer = full_state_from_shards(manifest, shards)
    return Checkpoint(Path(ckpt_dir), manifest, model, optimizer)


def _read_checked(path: Path, record: dict) -> bytes:
    _check_size(path, record["size"])
    try:
        with open(path, "rb") as f:
            data = f.read(record["size"] + 1)
    except OSError as e:
        raise damaged(path, f"cannot be read ({e})") from None
    if len(data) != record["size"]:
        raise damaged(path, f"changed size while being read ({len(data)} bytes, expected {record['size']})")
    if "sha256" in record:  # v1; a v2 file is checked tensor by tensor as it is used
        if sha256_hex(data) != record["sha256"]:
            raise damaged(path, "does not match its sha256 (flipped bits or a partial overwrite)")
    else:
        _check_digests(path, record)
    return data


def _check_digests(path: Path, record: dict) -> None:
    if digest_of_digests(record["tensors"]) != record["tensors_sha256"]:
        raise damaged(path, "has tensor digests that do not match its tensors_sha256 (a damaged manifest)")


def _check_size(path: Path, size: int) -> None:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise damaged(path, "is missing (deleted, or never written)") from None
    except OSError as e:
        raise damaged(path, f"cannot be read ({e})") from None
    if actual < size:
        raise damaged(path, f"is truncated: {actual} bytes, the manifest records {size}")
    if actual > size:
        raise damaged(path, f"has {actual - size} bytes more than the {size} the manifest records")
