"""Buffers ring neighbours on one host map from each other: shared memory instead of sends.

The in-memory redundancy (:mod:`distopt.ft.redundancy`) needs a shard's gradients on the
rank holding its replica every step, and the replica on whichever of the two survives a
failure. When the two processes run on one host, a file in ``/dev/shm`` that both map
replaces the transfer: one rank writes, the other reads in place, with no copy and no
socket. A mapping outlives a SIGKILLed process, so what a dead rank wrote (or what was
written for it) stays readable to the neighbour that mapped it.

Opening is a collective and all-or-nothing: if any rank cannot map its peer's file
(another host, no ``/dev/shm``, too little room there) every rank gets ``None`` and the
caller keeps its socket path. Files are unlinked as soon as every rank has mapped them,
so a killed process leaves nothing behind in ``/dev/shm``. ``DISTOPT_SHM=0`` turns windows off.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from distopt.collectives.base import Communicator

SHM_DIR = "/dev/shm"
log = logging.getLogger("distopt")


@dataclass
class Window:
    """This rank's shared bytes and the mapped bytes of its peer (both uint8 tensors)."""

    mine: torch.Tensor
    peer: torch.Tensor


def open_window(comm: Communicator, nbytes: int, peer_offset: int) -> Window | None:
    """Map ``nbytes`` shared bytes per rank; each rank also maps rank ``rank + peer_offset``'s.

    A collective. Returns None on every rank when any rank cannot take part.
    """
    w = comm.world_size
    token = torch.zeros(1, dtype=torch.int64)
    if comm.rank == 0:
        token[0] = int.from_bytes(os.urandom(7), "little")  # names this window's files; never reused
    comm.broadcast(token, src=0)
    enabled = os.environ.get("DISTOPT_SHM", "1") != "0" and w > 1 and nbytes > 0 and os.path.isdir(SHM_DIR)
    path = _path(int(token[0]), comm.rank)
    mine = peer = None
    try:
        mine = _create(path, nbytes) if enabled else None
        comm.barrier()  # every file exists before any peer looks for it
        if mine is not None:
            peer = _attach(_path(int(token[0]), (comm.rank + peer_offset) % w), nbytes)
        ok = torch.tensor([1.0 if peer is not None else 0.0])
        comm.allreduce(ok, "sum")
        comm.barrier()  # every peer has mapped its file: the name can go
    finally:
        if mine is not None:
            _unlink(path)
    return Window(mine, peer) if ok[0] == w else None


def carve(buf: torch.Tensor, dtype: torch.dtype, sizes: list[int], offset: int = 0) -> list[torch.Tensor]:
    """Consecutive 1-D ``dtype`` views of ``sizes`` elements in the bytes ``buf[offset:]``."""
    flat = buf[offset: offset + sum(sizes) * dtype.itemsize].view(dtype)
    return list(flat.split(sizes))


def _path(token: int, rank: int) -> str:
    return os.path.join(SHM_DIR, f"distopt-{token:014x}-{rank}")


def _create(path: str, nbytes: int) -> torch.Tensor | None:
    # The pages are reserved up front: a tmpfs that fills up later would kill the process
    # with SIGBUS on first touch instead of failing here.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        os.close(fd)
        _unlink(path)
        st = os.statvfs(SHM_DIR)
        log.warning("cannot reserve %d bytes in %s (%s; %d bytes free): the fault-tolerance redundancy goes "
                    "through sockets instead, which costs more per step. Give %s more room (docker run "
                    "--shm-size), or set DISTOPT_SHM=0 to choose the socket path", nbytes, SHM_DIR,
                    e.strerror, st.f_bavail * st.f_frsize, SHM_DIR)
        return None
    os.close(fd)
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def _attach(path: str, nbytes: int) -> torch.Tensor | None:
    try:
        if os.stat(path).st_size != nbytes:
            return None
    except OSError:  # not on this host
        return None
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
