"""Export weights as safetensors, written by hand (the format is small and public).

Layout: 8-byte little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
padded with spaces to a multiple of 8, then the raw little-endian tensor bytes, offsets
counted from the end of the header. The reader here exists to check the writer; like
the checkpoint reader it only parses JSON and raw bytes.
"""
from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

from distopt.checkpoint.format import atomic_write, dtype_name, nbytes_of, tensor_bytes, tensor_from_bytes

_CODES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
          "int32": "I32", "uint8": "U8", "bool": "BOOL"}
_NAMES = {code: name for name, code in _CODES.items()}
_MAX_HEADER = 100 * 2**20  # the reference implementation's cap


def export_safetensors(model_state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                       metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model_state`` to ``path`` in the safetensors format, atomically.

    Args:
        model_state: name -> tensor (any device; dtypes as the checkpoint format supports).
        path: the output file.
        metadata: optional ``str -> str`` pairs stored under ``__metadata__``.

    Returns:
        The path written.

    Raises:
        TypeError, ValueError: a non-str name or metadata entry, or an unsupported dtype.
    """
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str: convert values with str()")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in model_state.items():
        if not isinstance(name, str) or name == "__metadata__" or not isinstance(t, torch.Tensor):
            raise TypeError(f"entry {name!r}: names must be str (not '__metadata__') and values tensors")
        dtype = dtype_name(t.dtype)
        end = offset + nbytes_of(dtype, t.shape)
        header[name] = {"dtype": _CODES[dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the reference writer does
    # Tensors are converted one at a time as the file is written: extra memory is one tensor.
    atomic_write(path, itertools.chain([struct.pack("<Q", len(text)), text], map(tensor_bytes, model_state.values())))
    return Path(path)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file (as written by :func:`export_safetensors` or the reference library).

    Returns:
        name -> CPU tensor.

    Raises:
        ValueError: not a well-formed safetensors file, or a dtype this module does not read.
    """
    data = memoryview(Path(path).read_bytes())
    if len(data) < 8:
        raise ValueError(f"{path} is {len(data)} bytes: too short for a safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_HEADER, len(data) - 8):
        raise ValueError(f"{path}: header length {size} does not fit the {len(data)}-byte file")
    try:
        header = json.loads(bytes(data[8:8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    header.pop("__metadata__", None)
    body = data[8 + size:]
    return {name: _tensor(path, name, entry, body) for name, entry in header.items()}


def _tensor(path: str | os.PathLike, name: str, entry: object, body: memoryview) -> torch.Tensor:
    try:
        dtype, shape, (begin, end) = _NAMES[entry["dtype"]], list(entry["shape"]), entry["data_offsets"]
        ok = all(isinstance(s, int) and s >= 0 for s in shape) and 0 <= begin <= end <= len(body) \
            and end - begin == nbytes_of(dtype, shape)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: entry {name!r} = {entry!r} is not a valid tensor entry (dtype one of "
                         f"{sorted(_NAMES)}, data_offsets inside the data and matching the shape)")
    return tensor_from_bytes(body[begin:end], dtype, shape)
