"""A snapshot's place in the host memory the training process shares with its checkpoint
writer process (:mod:`distopt.runtime.writer_process`): the memory itself, where each
tensor's bytes go in it (every tensor starts on a ``FIELD_ALIGN``-byte boundary, as a
snapshot's fields do on the device), and the device-to-host copies that fill it, joined
where the device memory is laid out the same way.
"""
from __future__ import annotations

import mmap
import os
import warnings
import weakref

import torch

from distopt.checkpoint.format import dtype_name
from distopt.runtime.snapshots import FIELD_ALIGN


class SharedMemory:
    """Host memory mapped by the training process and the writer process, pinned for fast
    device-to-host copies when a GPU uses it."""

    def __init__(self, size: int) -> None:
        self.size = max(size, FIELD_ALIGN)
        self.fd = os.memfd_create("distopt-checkpoint", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self._map = mmap.mmap(self.fd, self.size)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.pinned = False

    def pin(self) -> None:
        """Page-lock the memory for CUDA: copies into it are then asynchronous."""
        if self.pinned:
            return
        err = torch.cuda.cudart().cudaHostRegister(self.bytes.data_ptr(), self.size, 0)
        if int(err) != 0:  # the copies still land, just slower and holding the host thread
            warnings.warn(f"checkpoint staging could not be pinned (cudaHostRegister error {int(err)}): "
                          "device-to-host copies of checkpoints will block training")
            return
        self.pinned = True

    def close(self) -> None:
        """Unpin and unmap; the writer process keeps its own mapping until it maps another."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())
            self.pinned = False
        self.bytes = None  # the tensor exports the map's buffer: it must go before the map closes
        self._map.close()
        os.close(self.fd)


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes, flat: a view of them where ``t`` is contiguous (one op for a snapshot's
    1-D fields), else of a contiguous copy."""
    if t.requires_grad:
        t = t.detach()
    if t.dim() == 1 and t.is_contiguous():
        return t.view(torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8)


def join_runs(todo: list[tuple[torch.Tensor, int]]) -> list[tuple[torch.Tensor, int]]:
    """``todo`` (bytes, offset in the shared memory) with neighbours joined: sources in one
    block of memory, as far apart there as in the shared memory (a snapshot's fields,
    see :class:`distopt.runtime.snapshots.Buffers`), are copied in one launch, padding and all. A launch is
    ~30 us of a training step's Python."""
    runs = todo[:1]
    for src, off in todo[1:]:
        last, last_off = runs[-1]
        if src.data_ptr() - last.data_ptr() == off - last_off >= last.numel() and \
                src.untyped_storage().data_ptr() == last.untyped_storage().data_ptr():
            runs[-1] = (last.as_strided((off - last_off + src.numel(),), (1,)), last_off)
        else:
            runs.append((src, off))
    return runs


class Placement:
    """Where a snapshot's tensors go in the shared memory, and the message fields that say so.

    Kept from one checkpoint to the next: the snapshot is the same kept tensors every time,
    and describing them anew (names, dtypes, shapes, offsets) was a sizeable share of a
    checkpoint step's Python on a GPU. Held weakly: it must not keep a snapshot alive.
    """

    def __init__(self, shard: dict | None, model: dict | None) -> None:
        self.fields: dict = {}
        self.offsets: list[int] = []
        self._refs: list = []  # (part key, name, weakref, shape, dtype) in layout order
        self.size, self.cuda = 0, False
        for key, part in (("shard", shard), ("model", model)):
            self.fields[key] = None if part is None else []
            for name, t in (part or {}).items():
                nbytes = t.numel() * t.element_size()
                self.fields[key].append([name, dtype_name(t.dtype), list(t.shape), self.size, nbytes])
                self._refs.append((key, name, weakref.ref(t), t.shape, t.dtype))
                self.offsets.append(self.size)
                self.size += -(-nbytes // FIELD_ALIGN) * FIELD_ALIGN
                self.cuda = self.cuda or t.is_cuda

    @staticmethod
    def tensors(shard: dict | None, model: dict | None) -> list[torch.Tensor]:
        """The tensors of a snapshot, in layout order."""
        return [*(shard or {}).values(), *(model or {}).values()]

    def fits(self, shard: dict | None, model: dict | None) -> bool:
        """Whether ``shard`` and ``model`` are the tensors this layout was made for, as they were."""
        if (shard is None) != (self.fields["shard"] is None) or (model is None) != (self.fields["model"] is None):
            return False
        items = [("shard", n, t) for n, t in (shard or {}).items()] + [("model", n, t) for n, t in (model or {}).items()]
        return len(items) == len(self._refs) and all(
            key == k and name == n and ref() is t and t.shape == shape and t.dtype == dtype
            for (key, name, t), (k, n, ref, shape, dtype) in zip(items, self._refs))
