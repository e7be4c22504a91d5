"""Writing a checkpoint: tensor files first, the manifest last.

A checkpoint is the folder ``root/step-{step:08d}/`` holding ``shard-{rank:05d}.bin`` (each
shard rank's optimizer state and its slice of the parameters), ``model.bin`` (the weights no
optimizer parameter holds: buffers, frozen parameters) and ``manifest.msgpack``. Every rank
writes its own slice of the weights, so no rank copies the whole model. The manifest is
written last and atomically: its presence marks the checkpoint complete, so a crash at any
earlier point leaves an incomplete folder that readers ignore.

In the distributed runtime the pieces are separate calls, in this order:

    every shard rank r   write_shard(d, r, {**opt.state_dict()["state"], "param": shard_params(opt)})
                         (ranks < plan world size)
    rank 0               fields = manifest_fields(state_dict, params, ..., model_state=model.state_dict())
                         write_model(d, model_file_tensors(model.state_dict(), fields))
    rank 0, after all    write_manifest(d, build_manifest(step, fields, model_record, shard_records))

:func:`save_checkpoint` does the same in one process.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Protocol, Union, runtime_checkable

import torch

from distopt.checkpoint.format import (
    FORMAT, MANIFEST, MODEL_FILE, PARAM_FIELD, atomic_write, digest_of_digests, dtype_name, fsync_dir, nbytes_of,
    shard_file, step_dir, tensor_bytes,
)
from distopt.checkpoint.manifest import check_fields, check_file_record, pack_manifest
from distopt.checkpoint.reshard import cut_params

PathLike = str | os.PathLike


@runtime_checkable
class Pieces(Protocol):
    """A flat tensor handed over as its raw bytes, piece by piece, instead of as one tensor.

    For memory that may change once it has been read: each piece must be final when it is
    yielded, and is consumed (hashed and written) before the next one is asked for
    (:class:`distopt.runtime.live_shard.LiveShard` reads a training rank's shard this way).
    """

    dtype: torch.dtype
    shape: tuple[int, ...]

    def pieces(self) -> Iterator[memoryview]:
        """The tensor's little-endian bytes, in order."""


TensorLike = Union[torch.Tensor, Pieces]


def make_checkpoint_dir(root: PathLike, step: int) -> Path:
    """Create (if needed) and return the folder for the checkpoint of ``step``.

    Any rank may call it; concurrent calls are fine.

    Raises:
        FileExistsError: that step already has a complete checkpoint (keep it; nothing to do).
    """
    folder = step_dir(root, step)
    folder.mkdir(parents=True, exist_ok=True)
    fsync_dir(folder.parent)  # the new folder entry must survive a crash as well as its files
    _refuse_complete(folder)
    return folder


def write_tensors(ckpt_dir: PathLike, file_name: str, tensors: Mapping[str, TensorLike]) -> dict:
    """Write ``tensors`` back to back as raw little-endian bytes into ``ckpt_dir/file_name``.

    Args:
        ckpt_dir: the checkpoint folder (from :func:`make_checkpoint_dir`).
        file_name: a plain file name.
        tensors: name -> tensor, any device; converted one at a time, so extra memory is
            one tensor's bytes. A :class:`Pieces` value is written as it yields its bytes.

    Returns:
        The file record ``{"file", "size", "tensors_sha256", "tensors": [{"name", "dtype",
        "shape", "offset", "nbytes", "sha256"}]}`` for the manifest; ``tensors_sha256`` is
        :func:`~distopt.checkpoint.format.digest_of_digests`, so each byte is hashed once.

    Raises:
        TypeError, ValueError: a non-tensor, a non-str name or an unsupported dtype, before
            anything is written; ValueError also when a :class:`Pieces` yields another number
            of bytes than its shape needs (the file is then not written).
        FileExistsError: the folder already holds a complete checkpoint.
    """
    folder = Path(ckpt_dir)
    _check_tensors(tensors)
    _refuse_complete(folder)
    records: list[dict] = []

    def chunks():
        offset = 0
        for name, t in tensors.items():
            digest, nbytes = hashlib.sha256(), 0
            for data in (t.pieces() if isinstance(t, Pieces) else [tensor_bytes(t)]):
                digest.update(data)
                nbytes += data.nbytes
                yield data
            dtype = dtype_name(t.dtype)
            if nbytes != nbytes_of(dtype, t.shape):
                raise ValueError(f"{name!r} gave {nbytes} bytes, its shape {list(t.shape)} of {dtype} needs "
                                 f"{nbytes_of(dtype, t.shape)}")
            records.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset,
                            "nbytes": nbytes, "sha256": digest.hexdigest()})
            offset += nbytes

    size = atomic_write(folder / file_name, chunks())
    record = {"file": file_name, "size": size, "tensors_sha256": digest_of_digests(records), "tensors": records}
    check_file_record(record, str(folder))
    return record


def write_shard(ckpt_dir: PathLike, rank: int, tensors: Mapping[str, TensorLike]) -> dict:
    """Write one shard rank's optimizer state and parameter slice as ``shard-{rank:05d}.bin``.

    Ranks ``0 .. plan["world_size"] - 1`` each write theirs: every worker at zero_stage >= 1,
    only rank 0 at zero_stage 0 (every rank holds the same whole state).

    Args:
        ckpt_dir: the checkpoint folder.
        rank: the shard rank.
        tensors: ``ShardedOptimizer.state_dict()["state"]`` (field -> this rank's flat shard),
            then ``"param"``: ``state_io.shard_params(opt)``, the rank's flat slice of the
            parameters in the same layout. :func:`build_manifest` checks the names.

    Returns:
        The shard's file record (see :func:`write_tensors`).

    Raises:
        TypeError, ValueError, FileExistsError: as :func:`write_tensors`.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank={rank!r} must be an int >= 0")
    return write_tensors(ckpt_dir, shard_file(rank), tensors)


def write_model(ckpt_dir: PathLike, tensors: Mapping[str, torch.Tensor]) -> dict:
    """Write the weights no optimizer parameter holds as ``model.bin``.

    Args:
        tensors: :func:`model_file_tensors` of the model's state dict (buffers, frozen
            parameters; often nothing, which writes an empty file).

    Returns:
        The file record. Raises as :func:`write_tensors`.
    """
    return write_tensors(ckpt_dir, MODEL_FILE, tensors)


def model_keys(model_state: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """``[[key, source]]`` for a manifest: which optimizer parameter holds each weight.

    A key's source is the parameter whose memory it is (tied weights share one), or "" when
    no parameter holds it (a buffer, a frozen parameter): those go to ``model.bin``.
    """
    def where(t: torch.Tensor) -> tuple:
        return t.device, t.dtype, t.data_ptr(), tuple(t.shape), tuple(t.stride())
    owner: dict[tuple, str] = {}
    for name, t in params.items():
        owner.setdefault(where(t), name)
    return [[key, owner.get(where(t), "")] for key, t in model_state.items()]


def model_file_tensors(model_state: Mapping[str, torch.Tensor], fields: dict) -> dict[str, torch.Tensor]:
    """The entries of ``model_state`` that go to ``model.bin`` (source "" in ``fields["model_keys"]``).

    Raises:
        KeyError: ``model_state`` lacks one of them.
    """
    return {key: model_state[key] for key, source in fields["model_keys"] if not source}


def manifest_fields(shard_state: dict, params: Mapping[str, torch.Tensor], *, seed: int, next_step: int,
                    model_state: Mapping[str, torch.Tensor] | None = None, extra: dict | None = None) -> dict:
    """The run description a manifest needs, from one rank's ``ShardedOptimizer.state_dict()``.

    Args:
        shard_state: any rank's ``state_dict()`` (world size, stage, step, rule and plan are
            the same on every rank).
        params: the optimizer's parameters, name -> tensor, in the order it was built with.
        seed: the run's seed.
        next_step: sampling position, the 0-based training step to run next.
        model_state: the model's ``state_dict()``, whose keys and order the checkpoint keeps
            (default: ``params``, for an optimizer used without a module).
        extra: optional small msgpack-able user data.

    Returns:
        A dict for :func:`build_manifest` / :func:`save_checkpoint`.

    Raises:
        ValueError: ``params`` does not match the plan.
    """
    fields = {
        "next_step": next_step, "world_size": shard_state["world_size"], "zero_stage": shard_state["zero_stage"],
        "seed": seed, "optimizer_step": shard_state["step"], "plan": shard_state["plan"],
        "rule": shard_state["rule"], "state_fields": list(shard_state["state"]),
        "params": [{"name": n, "dtype": dtype_name(t.dtype), "shape": list(t.shape)} for n, t in params.items()],
        "model_keys": model_keys(params if model_state is None else model_state, params),
    }
    if extra is not None:
        fields["extra"] = extra
    if shard_state.get("param_groups") is not None:
        fields["param_groups"] = shard_state["param_groups"]  # each group's rule, values and parameter names
    check_fields(fields, "manifest_fields")
    return fields


def build_manifest(step: int, fields: dict, model_record: dict, shard_records: list[dict]) -> dict:
    """Assemble a manifest from the run description and the file records, in rank order.

    Raises:
        ValueError: a malformed field or record, or ``fields["step"]`` differs from ``step``.
    """
    if fields.get("step", step) != step:
        raise ValueError(f"fields say step {fields['step']} but the checkpoint is for step {step}")
    manifest = {"format": FORMAT, **{k: v for k, v in fields.items() if k not in ("format", "step")},
                "step": step, "model": model_record, "shards": list(shard_records)}
    pack_manifest(manifest)  # validates everything now, before any caller relies on it
    return manifest


def write_manifest(ckpt_dir: PathLike, manifest: dict) -> Path:
    """Write the manifest, atomically and last: from here on the checkpoint is complete.

    Call it once every file it names is written (in the runtime: rank 0, after every shard
    rank reported its record). Each named file's size is checked against its record.

    Returns:
        The manifest's path.

    Raises:
        ValueError: the manifest is malformed.
        FileNotFoundError: a named file is missing or has another size (not yet written?).
        FileExistsError: the checkpoint is already complete.
    """
    folder = Path(ckpt_dir)
    data = pack_manifest(manifest)
    for record in [manifest["model"], *manifest["shards"]]:
        path = folder / record["file"]
        if not path.is_file() or path.stat().st_size != record["size"]:
            raise FileNotFoundError(f"{path} is missing or not {record['size']} bytes: write every shard and "
                                    f"model.bin before the manifest")
    _refuse_complete(folder)
    atomic_write(folder / MANIFEST, [data])
    return folder / MANIFEST


def save_checkpoint(root: PathLike, step: int, manifest_fields: dict, model_state: Mapping[str, torch.Tensor],
                    shard_states: Mapping[int, Mapping[str, torch.Tensor]]) -> Path:
    """Write a whole checkpoint from one process: shards, weights, then the manifest.

    Args:
        root: the checkpoint root; the checkpoint goes to ``root/step-{step:08d}``.
        step: the step the checkpoint is taken at.
        manifest_fields: from :func:`manifest_fields`.
        model_state: the weights, name -> tensor, with every key of ``fields["model_keys"]``;
            each shard's slice of the parameters is cut from it.
        shard_states: shard rank -> field -> flat state shard, for every rank of the plan.

    Returns:
        The checkpoint folder.

    Raises:
        ValueError: the fields are malformed or ranks are missing, before anything is written.
        FileExistsError: that step already has a complete checkpoint.
    """
    check_fields(manifest_fields, "manifest_fields")
    if "model_keys" not in manifest_fields:
        raise ValueError("manifest_fields has no 'model_keys': build it with distopt.checkpoint.manifest_fields()")
    ranks = list(range(manifest_fields["plan"]["world_size"]))
    if sorted(shard_states) != ranks:
        raise ValueError(f"shard_states has ranks {sorted(shard_states)}; the plan needs exactly {ranks}")
    _check_tensors(model_state)
    missing = [key for key, _ in manifest_fields["model_keys"] if key not in model_state]
    if missing:
        raise ValueError(f"model_state lacks {missing[:5]}: pass the state dict manifest_fields() was given")
    params = cut_params(manifest_fields, model_state)
    folder = make_checkpoint_dir(root, step)
    shards = [write_shard(folder, r, {**shard_states[r], PARAM_FIELD: params[r]}) for r in ranks]
    model = write_model(folder, model_file_tensors(model_state, manifest_fields))
    write_manifest(folder, build_manifest(step, manifest_fields, model, shards))
    return folder


def _check_tensors(tensors: Mapping[str, TensorLike]) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"expected a name -> tensor dict, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, (torch.Tensor, Pieces)):
            raise TypeError(f"entry {name!r}: names must be str and values tensors, got {type(t).__name__}")
        dtype_name(t.dtype)


def _refuse_complete(folder: Path) -> None:
    # Rewriting a file that a finished manifest vouches for would break it for any reader.
    if (folder / MANIFEST).exists():
        raise FileExistsError(f"{folder} already holds a complete checkpoint: keep it (nothing to do) or "
                              f"remove the folder first")
