"""The manifest: what a checkpoint holds, as one msgpack map, checked on write and on read.

Keys (all required unless marked optional):

    format          "distopt.checkpoint.v2" ("distopt.checkpoint.v1" is still read)
    step            the checkpoint's step (its folder is ``step-{step:08d}``)
    next_step       sampling position: the 0-based training step to run next
    world_size      workers that wrote it
    zero_stage      0, 1 or 2
    seed            the run's seed (sampling and model init derive from it)
    optimizer_step  updates the optimizer applied (skipped steps do not count)
    plan            ``ShardPlan.to_dict()`` the shards were cut by
    rule            the update rule's ``config()``
    params          ``[{"name", "dtype", "shape"}]``: optimizer parameters in plan order
    state_fields    optimizer state fields in each shard (``["exp_avg", "exp_avg_sq"]``)
    model_keys      v2: ``[[key, source]]``, the model's state-dict keys in order; ``source``
                    is the optimizer parameter holding that weight, or "" for a tensor of
                    ``model.bin`` (buffers, frozen parameters)
    model           file record of ``model.bin``: v2 the weights no parameter holds, v1 all
    shards          file record per shard rank (``plan["world_size"]`` of them): the state
                    fields, then (v2) ``"param"``, the rank's slice of the parameters
    data_position   optional: a stream's read position at ``next_step`` (``{"epoch", "shard",
                    "offset"}``, ints; see ``distopt.data.positions``); absent for map-style data
    extra           optional: small user data (msgpack-able)
    manifest_sha256 sha256 of the msgpack of every other key, in order (added on packing)

A file record is ``{"file", "size", "tensors_sha256", "tensors": [{"name", "dtype", "shape",
"offset", "nbytes", "sha256"}]}``: the tensors lie back to back over the whole file and
``tensors_sha256`` hashes their digests in order (see ``format.digest_of_digests``). A v1
record has ``"sha256"``, the file's own sha256, instead.
"""
from __future__ import annotations

import math
import re
from typing import Any

import msgpack

from distopt.checkpoint.format import (
    DTYPES, FORMAT, PARAM_FIELD, READ_FORMATS, damaged, nbytes_of, sha256_hex, shard_file,
)

_FIELDS: dict[str, type] = {
    "format": str, "step": int, "next_step": int, "world_size": int, "zero_stage": int, "seed": int,
    "optimizer_step": int, "plan": dict, "rule": dict, "params": list, "state_fields": list,
}
_FILES: dict[str, type] = {"model": dict, "shards": list}
_OPTIONAL: dict[str, type] = {"extra": dict, "model_keys": list, "param_groups": list, "data_position": dict}
_PLAN_KEYS = {"world_size", "align", "numels", "offsets", "buckets", "total"}
_SHA = re.compile(r"^[0-9a-f]{64}$")
CHECKSUM_KEY = "manifest_sha256"


def pack_manifest(manifest: dict) -> bytes:
    """msgpack bytes of ``manifest`` with its own checksum appended.

    Raises:
        ValueError: the manifest is malformed (a bug in the caller, caught before writing).
    """
    check_manifest(manifest)
    try:
        body = msgpack.packb(manifest, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"manifest holds a value msgpack cannot store ({e}): use plain int, float, str, "
                         f"bool, None, list and dict (convert tensors and numpy scalars with .item())") from None
    return msgpack.packb({**manifest, CHECKSUM_KEY: sha256_hex(body)}, use_bin_type=True)


def unpack_manifest(data: bytes, where: str) -> dict:
    """Decode and check manifest bytes. Only msgpack is parsed: nothing is ever executed.

    Raises:
        CheckpointError: not a msgpack map, wrong keys or types, other format version, or
            the manifest's own checksum does not match.
    """
    try:
        manifest = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
        raise damaged(where, f"is not a msgpack manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or CHECKSUM_KEY not in manifest:
        raise damaged(where, f"is not a distopt manifest (a msgpack {type(manifest).__name__} "
                             f"without {CHECKSUM_KEY!r})")
    claimed = manifest.pop(CHECKSUM_KEY)
    if manifest.get("format") not in READ_FORMATS:
        raise damaged(where, f"has format {manifest.get('format')!r}; this reader reads {' and '.join(READ_FORMATS)}")
    if claimed != sha256_hex(msgpack.packb(manifest, use_bin_type=True)):
        raise damaged(where, "does not match its own checksum (the manifest is damaged)")
    try:
        check_manifest(manifest)
    except ValueError as e:
        raise damaged(where, f"is malformed: {e}") from None
    return manifest


def check_fields(fields: dict, where: str = "manifest") -> None:
    """Check the run description part of a manifest (all but format, step and the file records).

    Raises:
        ValueError: a missing or mistyped key, or params that do not match the plan.
    """
    if not isinstance(fields, dict):
        raise ValueError(f"{where} must be a dict, got {type(fields).__name__}")
    _check_types(fields, {k: t for k, t in _FIELDS.items() if k not in ("format", "step")}, where)
    if fields["zero_stage"] not in (0, 1, 2) or fields["world_size"] < 1 or fields["next_step"] < 0 \
            or fields["optimizer_step"] < 0 or fields.get("step", 0) < 0:
        got = {k: fields.get(k) for k in ("zero_stage", "world_size", "step", "next_step", "optimizer_step")}
        raise ValueError(f"{where}: zero_stage must be 0-2, world_size >= 1 and steps >= 0 (got {got})")
    plan = fields["plan"]
    if set(plan) != _PLAN_KEYS:
        raise ValueError(f"{where}: plan has keys {sorted(plan)}, expected {sorted(_PLAN_KEYS)} (ShardPlan.to_dict())")
    shards = fields["world_size"] if fields["zero_stage"] >= 1 else 1
    if plan["world_size"] != shards:
        raise ValueError(f"{where}: plan is for {plan['world_size']} shards; zero_stage={fields['zero_stage']} on "
                         f"{fields['world_size']} workers shards over {shards}")
    _check_params(fields["params"], plan["numels"], where)
    if not all(isinstance(f, str) and f != PARAM_FIELD for f in fields["state_fields"]):
        raise ValueError(f"{where}: state_fields must be a list of names other than {PARAM_FIELD!r}, got "
                         f"{fields['state_fields']!r}")
    if "model_keys" in fields:
        _check_model_keys(fields["model_keys"], {p["name"] for p in fields["params"]}, where)


def check_manifest(manifest: dict, where: str = "manifest") -> None:
    """Check a whole manifest: the run description and every file record.

    Raises:
        ValueError: anything malformed, named.
    """
    if not isinstance(manifest, dict):
        raise ValueError(f"{where} must be a dict, got {type(manifest).__name__}")
    _check_types(manifest, {**_FIELDS, **_FILES}, where)
    check_fields(manifest, where)
    if manifest["format"] not in READ_FORMATS:
        raise ValueError(f"{where}: format is {manifest['format']!r}, expected {FORMAT!r}")
    v2 = manifest["format"] == FORMAT
    extra = set(manifest) - set(_FIELDS) - set(_FILES) - set(_OPTIONAL)
    if extra or not isinstance(manifest.get("extra", {}), dict) or ("model_keys" in manifest) != v2:
        raise ValueError(f"{where}: unexpected keys {sorted(extra)}, 'extra' not a dict, or 'model_keys' "
                         f"{'missing' if v2 else 'present'} in a {manifest['format']} manifest")
    for record in [manifest["model"], *manifest["shards"]]:
        if ("tensors_sha256" in record) != v2:
            raise ValueError(f"{where}: {manifest['format']} file records carry "
                             f"{'tensors_sha256' if v2 else 'sha256'}; {record.get('file')!r} does not")
    check_file_record(manifest["model"], where)
    if v2:
        in_file = [key for key, source in manifest["model_keys"] if not source]
        held = [t["name"] for t in manifest["model"]["tensors"]]
        if sorted(held) != sorted(in_file):
            raise ValueError(f"{where}: model.bin holds {held}; model_keys place {in_file} there")
    shards = manifest["shards"]
    if len(shards) != manifest["plan"]["world_size"]:
        raise ValueError(f"{where}: {len(shards)} shard records for a plan of {manifest['plan']['world_size']} shards")
    expected = shard_tensor_names(manifest)
    for rank, record in enumerate(shards):
        check_file_record(record, where)
        names = [t["name"] for t in record["tensors"]]
        if record["file"] != shard_file(rank) or names != expected:
            raise ValueError(f"{where}: shard record {rank} is {record['file']!r} holding {names}; expected "
                             f"{shard_file(rank)!r} holding {expected}")
        if v2:
            _check_param_record(record["tensors"][-1], manifest["params"], manifest["plan"], where)


def shard_tensor_names(manifest: dict) -> list[str]:
    """The tensors every shard file of ``manifest`` holds, in order."""
    return list(manifest["state_fields"]) + ([PARAM_FIELD] if manifest["format"] == FORMAT else [])


def _check_model_keys(model_keys: Any, params: set[str], where: str) -> None:
    ok = all(isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e) and e[0]
             and (not e[1] or e[1] in params) for e in model_keys)
    if not ok:
        raise ValueError(f"{where}: model_keys must be [key, source] pairs of str, each source a parameter name "
                         f"or '' (got {model_keys!r:.200})")
    keys = [k for k, _ in model_keys]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{where}: model_keys name a key twice: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    unheld = sorted(params - {s for _, s in model_keys})
    if unheld:
        raise ValueError(f"{where}: parameters {unheld[:5]} are no model key's source: their weights would be lost")


def _check_param_record(t: dict, params: list, plan: dict, where: str) -> None:
    dtypes = {p["dtype"] for p in params}
    numel = sum((e - s) // plan["world_size"] for s, e in plan["buckets"])
    if t["dtype"] not in dtypes or len(dtypes) != 1 or t["shape"] != [numel]:
        raise ValueError(f"{where}: shard tensor {PARAM_FIELD!r} is {t['dtype']}{t['shape']}; the params are "
                         f"{sorted(dtypes)} and the plan gives every rank [{numel}] elements")


def check_file_record(record: Any, where: str = "manifest") -> None:
    """Check one file record, so a reader can trust its offsets before touching any bytes.

    Raises:
        ValueError: a bad file name (paths are refused), size, checksum or tensor entry.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: file record must be a dict, got {type(record).__name__}")
    # v1 records hash the whole file ("sha256"); v2 ones hash each tensor once and the
    # digests together ("tensors_sha256"), which needs the tensors to cover every byte.
    key = "tensors_sha256" if "tensors_sha256" in record else "sha256"
    _check_types(record, {"file": str, "size": int, key: str, "tensors": list}, where)
    name = record["file"]
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name or \
            set(record) != {"file", "size", key, "tensors"}:
        raise ValueError(f"{where}: file name {name!r} is not a plain file name in the checkpoint folder, or the "
                         f"record has keys {sorted(record)}")
    if not _SHA.match(record[key]) or record["size"] < 0:
        raise ValueError(f"{where}: {name}: bad size {record['size']} or {key} {record[key]!r}")
    seen, end = set(), 0
    for t in record["tensors"]:
        _check_tensor(t, record["size"], f"{where}: {name}")
        if t["name"] in seen:
            raise ValueError(f"{where}: {name} lists tensor {t['name']!r} twice")
        seen.add(t["name"])
        if key == "tensors_sha256" and t["offset"] != end:
            raise ValueError(f"{where}: {name}: tensor {t['name']!r} starts at byte {t['offset']}, not {end}: "
                             f"the tensors must cover the file back to back")
        end = t["offset"] + t["nbytes"]
    if key == "tensors_sha256" and end != record["size"]:
        raise ValueError(f"{where}: {name}: the tensors cover {end} of its {record['size']} bytes")


def _check_tensor(t: Any, size: int, where: str) -> None:
    if not isinstance(t, dict):
        raise ValueError(f"{where}: tensor record must be a dict, got {type(t).__name__}")
    _check_types(t, {"name": str, "dtype": str, "shape": list, "offset": int, "nbytes": int, "sha256": str},
                 where)
    if t["dtype"] not in DTYPES or not _is_shape(t["shape"]):
        raise ValueError(f"{where}: tensor {t['name']!r} has dtype {t['dtype']!r} / shape {t['shape']!r}; "
                         f"dtypes are {sorted(DTYPES)}, shapes lists of ints >= 0")
    if t["nbytes"] != nbytes_of(t["dtype"], t["shape"]) or t["offset"] < 0 or t["offset"] + t["nbytes"] > size \
            or not _SHA.match(t["sha256"]):
        raise ValueError(f"{where}: tensor {t['name']!r} claims bytes [{t['offset']}, {t['offset'] + t['nbytes']}) "
                         f"of a {size}-byte file for {t['dtype']}{t['shape']} (or a bad sha256)")


def _check_params(params: list, numels: Any, where: str) -> None:
    if not isinstance(numels, list) or len(params) != len(numels):
        raise ValueError(f"{where}: {len(params)} params for a plan of {numels!r} tensors")
    for p, n in zip(params, numels):
        if not isinstance(p, dict) or set(p) != {"name", "dtype", "shape"} or not isinstance(p["name"], str) \
                or p["dtype"] not in DTYPES or not _is_shape(p["shape"]) or math.prod(p["shape"]) != n:
            raise ValueError(f"{where}: param entry {p!r} must be {{'name', 'dtype', 'shape'}} with {n} elements "
                             f"(the plan's numel)")
    names = [p["name"] for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: params name a tensor twice: {sorted(n for n in set(names) if names.count(n) > 1)}")


def _check_types(d: dict, types: dict[str, type], where: str) -> None:
    for key, kind in types.items():
        value = d.get(key)
        # bool is an int subclass; a True where a count belongs is still a bug.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}: {key!r} must be a {kind.__name__}, got {type(value).__name__}")


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
