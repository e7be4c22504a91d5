"""A checkpoint of a rank's shard written from the live tensors, copied only where it must be.

Between a checkpoint step and the next update nothing changes the rank's parameter slice
or optimizer state, so the writer thread can hash and write them straight from training's
memory. Just before the next update (or a rollback, or a load) changes them, the trainer
calls :meth:`LiveShard.freeze`, which copies into staging memory only the part the writer
has not read yet; the writer goes on from there. A write that finishes before the next
update copies nothing, and the checkpoint step itself copies nothing at all.

The writer reads the shard in pieces of about 1 MiB, each copied first into a small
private buffer (it is then hashed and written from cache). The hand-over needs no lock:

* the writer's "next piece" names the piece it is reading or reads next. It moves past a
  piece once it has read it and then found ``frozen`` still unset (the piece was read
  entirely before ``freeze`` began, so it is final), or once it has the piece's copy;
* ``freeze`` sets ``frozen``, then copies every piece from the next one on, then signals;
  a piece that ``frozen`` caught before or during its read is taken from the copy.

A piece is therefore either read before any change or copied before any change.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator, Mapping, Sequence

import torch

from distopt.checkpoint.format import tensor_bytes

PIECE_BYTES = 2**20


class LiveShard:
    """One rank's shard fields (each a list of live tensors, written flat and back to back),
    readable by one writer thread until :meth:`freeze`.

    Args:
        fields: name -> the tensors whose concatenation is that field (CPU, one dtype).
        staging: ``staging(name, numel)`` gives the flat tensor a field is copied into on
            :meth:`freeze` (uninitialised memory, kept from the last checkpoint or new).
        piece_bytes: bytes the writer reads at a time.
    """

    def __init__(self, fields: Mapping[str, Sequence[torch.Tensor]], staging: Callable[[str, int], torch.Tensor],
                 piece_bytes: int = PIECE_BYTES) -> None:
        first = next(t for ts in fields.values() for t in ts) if any(fields.values()) else None
        dtype = first.dtype if first is not None else torch.float32
        step = max(1, piece_bytes // torch.empty((), dtype=dtype).element_size())
        # Pieces are (part, lo, hi) only: their views are made when read or copied, so the
        # checkpoint step does not pay for slicing every piece.
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (live, staged) flat tensors, in write order
        self._pieces: list[tuple[int, int, int]] = []
        self._fields: dict[str, _Field] = {}
        for name, ts in fields.items():
            if any(t.device.type != "cpu" or t.dtype != dtype for t in ts):
                raise ValueError(f"field {name!r}: a live shard reads CPU tensors of one dtype ({dtype}); "
                                 f"copy GPU tensors first (snapshots.snapshot does)")
            flat, start, offset = staging(name, sum(t.numel() for t in ts)), len(self._pieces), 0
            for t in ts:
                n = t.numel()
                self._parts.append((t.reshape(-1), flat[offset: offset + n]))
                self._pieces += [(len(self._parts) - 1, lo, min(lo + step, n)) for lo in range(0, n, step)]
                offset += n
            self._fields[name] = _Field(self, dtype, (offset,), range(start, len(self._pieces)))
        self._bounce = torch.empty(step, dtype=dtype)
        self._next = 0  # the piece the writer reads now or next; freeze copies from it on
        self.frozen = False
        self._copied = threading.Event()
        self._lost = ""  # why freeze failed: the rest of the shard is then nowhere
        self.copied_bytes = 0  # what freeze had to copy

    def tensors(self) -> dict[str, "_Field"]:
        """Each field as :class:`distopt.checkpoint.writer.Pieces`, for ``write_shard``."""
        return dict(self._fields)

    def freeze(self) -> None:
        """Copy what the writer has not read yet; call before the live tensors change. Idempotent."""
        if self.frozen:
            return
        self.frozen = True
        try:
            rest = [self._views(i) for i in range(self._next, len(self._pieces))]
            if rest:
                torch._foreach_copy_([staged for _, staged in rest], [live for live, _ in rest])
                self.copied_bytes = sum(s.numel() for _, s in rest) * self._bounce.element_size()
        except BaseException as e:
            self._lost = f"{type(e).__name__}: {e}"  # the writer must not take uninitialised memory for the shard
            raise
        finally:
            self._copied.set()  # a writer waiting for the copies must never wait forever

    def read(self, i: int) -> memoryview:
        """Piece ``i``'s bytes, final; one writer thread asks for the pieces in order.

        Raises:
            RuntimeError: ``i`` is not the next piece (a freeze copies from the next on, so
                a piece skipped and read later could have changed meanwhile), or the freeze
                failed to copy it.
        """
        if i != self._next:
            raise RuntimeError(f"piece {i} asked for while piece {self._next} is next: write the fields "
                               f"of a LiveShard once each, in the order tensors() gives them")
        live, staged = self._views(i)
        if not self.frozen:
            bounce = self._bounce[: live.numel()]
            self._load(bounce, live)
            if not self.frozen:
                self._next = i + 1
                return tensor_bytes(bounce)
        self._copied.wait()
        if self._lost:
            raise RuntimeError(f"copying the unread rest of the shard failed ({self._lost}): this checkpoint "
                               f"is abandoned")
        self._next = i + 1  # (freeze has copied from piece i on already)
        return tensor_bytes(staged)

    def _views(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        part, lo, hi = self._pieces[i]
        live, staged = self._parts[part]
        return live[lo:hi], staged[lo:hi]

    def _load(self, bounce: torch.Tensor, live: torch.Tensor) -> None:
        bounce.copy_(live)  # (a test interleaves a freeze and an update with this read)


class _Field:
    """One field of a :class:`LiveShard`, as the checkpoint writer takes it (``Pieces``)."""

    def __init__(self, shard: LiveShard, dtype: torch.dtype, shape: tuple[int, ...], indices: range) -> None:
        self._shard, self.dtype, self.shape, self._indices = shard, dtype, shape, indices

    def pieces(self) -> Iterator[memoryview]:
        for i in self._indices:
            yield self._shard.read(i)
