"""Checkpoints on disk: a msgpack manifest plus raw tensor bytes, checksummed, never pickled.

A checkpoint is ``root/step-{step:08d}/`` with one ``shard-{rank:05d}.bin`` per shard rank
(its optimizer state and its slice of the parameters), ``model.bin`` (weights no parameter
holds) and ``manifest.msgpack``, written last: its presence marks the checkpoint complete.
Reading checks sizes and sha256 before any byte is used; shards are resharded through the
saved plan, so a checkpoint loads on any world size and stage.
Every damaged-checkpoint error is a :class:`CheckpointError`: use another checkpoint.
"""
from distopt.checkpoint.export import export_safetensors, read_safetensors
from distopt.checkpoint.format import FORMAT, CheckpointError, step_dir
from distopt.checkpoint.prune import prune, remove_checkpoint
from distopt.checkpoint.reader import (
    Checkpoint, latest_valid, list_checkpoints, load_checkpoint, load_manifest, read_shards, read_tensors, verify,
)
from distopt.checkpoint.reshard import full_state_from_shards, weights_from_shards
from distopt.checkpoint.writer import (
    build_manifest, make_checkpoint_dir, manifest_fields, model_file_tensors, model_keys, save_checkpoint,
    write_manifest, write_model, write_shard, write_tensors,
)

__all__ = [
    "CheckpointError", "FORMAT", "step_dir",
    "make_checkpoint_dir", "write_tensors", "write_shard", "write_model", "manifest_fields", "model_keys",
    "model_file_tensors", "build_manifest",
    "write_manifest", "save_checkpoint", "prune", "remove_checkpoint",
    "list_checkpoints", "load_manifest", "read_tensors", "read_shards", "verify", "latest_valid",
    "load_checkpoint", "Checkpoint", "full_state_from_shards", "weights_from_shards",
    "export_safetensors", "read_safetensors",
]
