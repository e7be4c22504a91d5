"""On-disk primitives: raw little-endian tensor bytes, checksums, atomic writes, file names.

A tensor file holds only raw bytes. Its dtype, shape, byte length and sha256 live in the
manifest, so nothing about a tensor is ever inferred from (let alone executed out of) a
file's contents. Every file is written under a temporary name in its final folder,
fsynced, renamed into place and the folder fsynced: a reader sees the old file or the
whole new one, never a part.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import uuid
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

# v2: each shard file also holds its rank's slice of the parameters (PARAM_FIELD), so the
# weights are written by every rank in parallel and model.bin keeps only what no optimizer
# owns (buffers, frozen parameters). v1 (model.bin holds every weight) is still read.
FORMAT = "distopt.checkpoint.v2"
FORMAT_V1 = "distopt.checkpoint.v1"
READ_FORMATS = (FORMAT, FORMAT_V1)
PARAM_FIELD = "param"
MANIFEST = "manifest.msgpack"
MODEL_FILE = "model.bin"
TMP_MARK = ".tmp."
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or damaged. Fix: use another checkpoint."""


def damaged(where: str | os.PathLike, what: str) -> CheckpointError:
    """The error for a damaged checkpoint file: which file, what is wrong, and the fix."""
    return CheckpointError(f"{where} {what}. Fix: use another checkpoint (distopt.checkpoint.latest_valid(root) "
                           f"picks the newest one that verifies) or restore this file from a copy")


class DType(NamedTuple):
    """How one supported dtype is stored."""

    torch: torch.dtype
    stored: np.dtype  # little-endian numpy type of the raw words
    view: torch.dtype  # same-width torch type numpy understands (bf16 -> int16, bool -> uint8)


DTYPES: dict[str, DType] = {
    "float32": DType(torch.float32, np.dtype("<f4"), torch.float32),
    "float64": DType(torch.float64, np.dtype("<f8"), torch.float64),
    "float16": DType(torch.float16, np.dtype("<f2"), torch.float16),
    # numpy has no bfloat16: its 2-byte words travel as int16, bit for bit.
    "bfloat16": DType(torch.bfloat16, np.dtype("<i2"), torch.int16),
    "int64": DType(torch.int64, np.dtype("<i8"), torch.int64),
    "int32": DType(torch.int32, np.dtype("<i4"), torch.int32),
    "uint8": DType(torch.uint8, np.dtype("u1"), torch.uint8),
    "bool": DType(torch.bool, np.dtype("u1"), torch.uint8),
}
_BY_TORCH = {spec.torch: name for name, spec in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The stored name of a torch dtype.

    Raises:
        ValueError: the dtype cannot be stored.
    """
    if dtype not in _BY_TORCH:
        raise ValueError(f"cannot checkpoint dtype {dtype}: supported are {sorted(DTYPES)}; "
                         f"cast the tensor first, e.g. .to(torch.float32)")
    return _BY_TORCH[dtype]


def nbytes_of(dtype: str, shape: Sequence[int]) -> int:
    """Bytes a tensor of stored dtype name ``dtype`` and ``shape`` takes."""
    return math.prod(shape) * DTYPES[dtype].stored.itemsize


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (moved to CPU, made contiguous), as a flat byte view.

    Raises:
        ValueError: unsupported dtype.
    """
    spec = DTYPES[dtype_name(t.dtype)]
    arr = t.detach().cpu().contiguous().view(spec.view).numpy()
    # A no-op on little-endian hosts; on big-endian ones it swaps into the stored order.
    arr = arr.astype(spec.stored, copy=False).reshape(-1)
    return memoryview(arr.view(np.uint8))


def tensor_from_bytes(data: bytes | memoryview, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """Rebuild a tensor from raw bytes whose dtype and shape come from the manifest.

    The result owns its memory (a copy), so ``data`` may be released afterwards.
    """
    spec = DTYPES[dtype]
    arr = np.frombuffer(data, dtype=spec.stored).astype(spec.stored.newbyteorder("="), copy=True)
    return torch.from_numpy(arr).view(spec.torch).reshape(tuple(shape))


def sha256_hex(data: bytes | memoryview) -> str:
    """Hex sha256 of a byte buffer."""
    return hashlib.sha256(data).hexdigest()


def digest_of_digests(tensors: Sequence[dict]) -> str:
    """A v2 file's checksum: the hex sha256 of its tensors' raw sha256 digests, in file order.

    The tensors tile the file, so this is a function of every byte, and writing or reading
    the file hashes each byte once (v1 hashed every byte twice: per tensor and per file).
    """
    return hashlib.sha256(b"".join(bytes.fromhex(t["sha256"]) for t in tensors)).hexdigest()


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> int:
    """Write ``chunks`` to ``path`` atomically and durably (see :func:`atomic_path`).

    Returns:
        The bytes written.
    """
    size = 0
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        for chunk in chunks:
            f.write(chunk)
            size += memoryview(chunk).nbytes
    return size


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; on a clean exit it replaces ``path``.

    On exit: fsync the file, rename it over ``path``, fsync the folder. A crash leaves
    either the old file or the new one, plus at most a temporary file that
    :func:`distopt.checkpoint.prune` removes; an exception removes the temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so a rename or a new entry in it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temp(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporary names."""
    return name.startswith(".") and TMP_MARK in name


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint taken at ``step``: ``root/step-{step:08d}``."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step={step!r} must be an int >= 0")
    return Path(root) / f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint folder name, or None for anything else."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def shard_file(rank: int) -> str:
    """File name of ``rank``'s optimizer-state shard."""
    return f"shard-{rank:05d}.bin"
