"""What a checkpoint takes from a rank at its step: the shard (its state and slice of the
parameters) and, on rank 0, the manifest's run description and the model buffers no
parameter holds.

On GPU the shard is copied on the device in one launch, into memory kept from one
checkpoint to the next (:class:`Buffers`), laid out field by field as the writer process's
shared memory lays it out (``FIELD_ALIGN``). On CPU it may instead be read in place until
the next update (:mod:`distopt.runtime.live_shard`). The writers that take a snapshot to
disk are in :mod:`distopt.runtime.checkpointing` and :mod:`distopt.runtime.writer_process`.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from distopt import checkpoint as ckpt
from distopt.checkpoint.format import PARAM_FIELD
from distopt.optim import state_io
from distopt.runtime.live_shard import LiveShard

FIELD_ALIGN = 64  # bytes: where each field of a snapshot starts in device memory and on the host


class Buffers:
    """Snapshot memory kept from one checkpoint to the next: a fresh large allocation costs a
    page fault per page on first touch, more than the copy into it."""

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] = {}
        # The last copy's sources (weakly: a rebuilt optimizer's old state must be freed) and
        # the views of kept memory they went to. On a GPU a step is a few milliseconds of
        # Python, and splitting and flattening six tensors anew cost a checkpoint step ~2%.
        self._plan: tuple[list, list[int], list[torch.Tensor], dict[str, torch.Tensor]] | None = None

    def take(self, key: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor for ``key`` (the kept one when it fits)."""
        buf = self._kept.get(key)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype or buf.device != device:
            buf = self._kept[key] = torch.empty(shape, dtype=dtype, device=device)
            self._plan = None
        return buf

    def copy(self, parts: dict[str, list[torch.Tensor]], dtype: torch.dtype, device: torch.device
             ) -> dict[str, torch.Tensor]:
        """Each field of ``parts`` (tensors of ``dtype`` on ``device``) copied flat into kept
        memory, in one launch. The fields are views of one block, each starting on a
        ``FIELD_ALIGN``-byte boundary: laid out as a writer process's shared memory, a piece
        of the copy to the host is then one launch, not one per field."""
        sources = [t for ts in parts.values() for t in ts]
        plan = self._plan
        if plan is None or not self._same(plan, parts, sources, dtype, device):
            unit = max(1, FIELD_ALIGN // dtype.itemsize)
            sizes = {k: sum(t.numel() for t in ts) for k, ts in parts.items()}
            block = self.take("(snapshot)", (sum(-(-n // unit) * unit for n in sizes.values()),), dtype, device)
            flats, into, at = {}, [], 0
            for k, ts in parts.items():
                flats[k] = flat = block[at: at + sizes[k]]
                at += -(-sizes[k] // unit) * unit
                into += [view.view(t.shape) for view, t in zip(flat.split([t.numel() for t in ts]), ts)]
            plan = self._plan = ([weakref.ref(t) for t in sources], [len(ts) for ts in parts.values()], into, flats)
        torch._foreach_copy_(plan[2], sources)
        return dict(plan[3])

    @staticmethod
    def _same(plan: tuple, parts: dict, sources: list[torch.Tensor], dtype: torch.dtype,
              device: torch.device) -> bool:
        refs, counts, into, flats = plan
        return (len(refs) == len(sources) and list(flats) == list(parts)
                and counts == [len(ts) for ts in parts.values()]
                and all(r() is t and t.shape == v.shape for r, t, v in zip(refs, sources, into))
                and all(f.dtype == dtype and f.device == device for f in flats.values()))


class RunFields:
    """Rank 0's manifest fields, built once per optimizer.

    All but the step counters describe the optimizer (its world size, stage, plan, rule and
    parameters) and the model, which stay as they are until the optimizer is rebuilt (a
    recovery, a rejoin): a checkpoint step then pays for two integers, not for the plan,
    the parameter list and the model's state dict.
    """

    def __init__(self) -> None:
        self._for: tuple | None = None  # (optimizer weakref, rule, model weakref, seed)
        self._fields: dict = {}
        self._loose: list[str] = []  # model keys no parameter holds (model.bin)

    def get(self, opt, model: torch.nn.Module, seed: int, next_step: int,
            data_position: dict | None = None) -> tuple[dict, list[str]]:
        """The fields of a checkpoint after ``next_step`` steps (a stream's read position then,
        when given), and the model keys to copy."""
        held = self._for
        if held is None or held[0]() is not opt or held[1] is not opt.rule or held[2]() is not model \
                or held[3] != seed:
            header = {**state_io.shard_header(opt), "state": state_io.state_fields(opt)}
            self._fields = ckpt.manifest_fields(header, dict(zip(opt.names, opt.tensors)), seed=seed,
                                                next_step=next_step, model_state=model.state_dict())
            self._loose = [key for key, source in self._fields["model_keys"] if not source]
            self._for = (weakref.ref(opt), opt.rule, weakref.ref(model), seed)
        fields = {**self._fields, "next_step": next_step, "optimizer_step": opt.step_count,
                  "param_groups": state_io.group_hyperparameters(opt)}
        if data_position is not None:
            fields["data_position"] = data_position
        return fields, self._loose


def shard_parts(opt, rank: int) -> dict[str, list[torch.Tensor]] | None:
    """The tensors of this rank's checkpoint shard, by field: its state and its slice of the
    parameters; None on a rank that writes no shard (zero_stage 0, rank > 0)."""
    if opt.plan.world_size == 1 and rank != 0:
        return None
    return {**state_io.state_fields(opt), PARAM_FIELD: opt.shard_params}


class Snapshot(NamedTuple):
    """What a checkpoint needs from one rank (see :func:`snapshot`)."""

    shard: dict | None  # field -> copy or live pieces; None on a rank that writes no shard
    model: dict | None  # rank 0: the weights no parameter holds (copies)
    fields: dict | None  # rank 0: the manifest's run description
    live: LiveShard | None  # freeze() it before the shard's memory changes


def snapshot(opt, model: torch.nn.Module, rank: int, seed: int, next_step: int, with_model: bool,
             buffers: Buffers | None = None, live: bool = False, run_fields: RunFields | None = None,
             data_position: dict | None = None) -> Snapshot:
    """What a checkpoint needs from this rank: its shard, and on rank 0 the rest.

    The shard is this rank's state and its slice of the parameters, so the ranks copy the
    weights between them; rank 0 adds what no parameter holds (buffers), always copied,
    since the next forward pass changes them. With ``live`` (CPU only) the shard is not
    copied: it is read in place until ``Snapshot.live.freeze()``, which the caller must run
    before the next update (:mod:`distopt.runtime.live_shard`). Otherwise it is copied now,
    in one launch. With ``buffers`` the copies go into memory kept from the last snapshot,
    which must no longer be in use (its write finished); ``run_fields`` keeps rank 0's
    manifest fields from one snapshot to the next.
    """
    like = opt.params_flat.data

    def take(key: str, numel: int) -> torch.Tensor:
        if buffers is None:
            return torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffers.take(key, (numel,), like.dtype, like.device)
    shard, reader, parts = None, None, shard_parts(opt, rank)
    if parts is not None:
        if live and like.device.type == "cpu":
            reader = LiveShard(parts, take)
            shard = reader.tensors()
        else:
            shard = (buffers or Buffers()).copy(parts, like.dtype, like.device)
    if not with_model:
        return Snapshot(shard, None, None, reader)
    fields, loose = (run_fields or RunFields()).get(opt, model, seed, next_step, data_position)
    model_state = model.state_dict() if loose else {}
    # Copied where they live (a GPU copy takes microseconds); a GPU rank's writer process moves them to the host.
    rest = {k: (buffers.take(f"model/{k}", v.shape, v.dtype, v.device).copy_(v) if buffers is not None
                else v.detach().clone()) for k, v in ((k, model_state[k]) for k in loose)}
    return Snapshot(shard, rest, fields, reader)
