"""Export weights as safetensors, through the ``safetensors`` package.

The file is the reference library's own, so ``safetensors.torch.load_file`` (and anything
built on it) loads it under the model's parameter names, and loading never runs code. The
write is atomic as the checkpoint files are: a temporary name in the same folder, fsync,
rename, fsync the folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distopt.checkpoint.format import atomic_path


def export_safetensors(model_state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                       metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model_state`` to ``path`` in the safetensors format, atomically.

    Tensors that share memory (tied weights) are written once per name, so every name of
    the model's ``state_dict`` is in the file.

    Args:
        model_state: name -> tensor (any device).
        path: the output file.
        metadata: optional ``str -> str`` pairs stored under ``__metadata__``.

    Returns:
        The path written.

    Raises:
        TypeError: a non-str name, a value that is not a tensor, or metadata that is not str -> str.
    """
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str: convert values with str()")
    tensors = _separate_cpu(model_state)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
    return Path(path)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file with ``safetensors.torch.load_file``.

    Returns:
        name -> CPU tensor, in the file's order.

    Raises:
        ValueError: not a well-formed safetensors file (the message names the file).
    """
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a well-formed safetensors file: {e}") from None


def _separate_cpu(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses shared ones)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model_state.items():
        if not isinstance(name, str) or name == "__metadata__" or not isinstance(t, torch.Tensor):
            raise TypeError(f"entry {name!r}: names must be str (not '__metadata__') and values tensors")
        t = t.detach().to("cpu").contiguous()
        key = t.untyped_storage().data_ptr()
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out
