"""The checkpoint writer process (:mod:`distopt.runtime.writer_process` starts it): it maps
the training process's shared memory, writes the checkpoint files each message describes
and sends back their records, until the training process closes the socket or is gone.
It never touches CUDA. Run as ``python -m distopt.runtime.writer_main FD``.
"""
from __future__ import annotations

import mmap
import os
import socket
import sys
from typing import Iterator

import msgpack

from distopt.checkpoint.format import DTYPES
from distopt.runtime.checkpointing import lower_priority, write_files

READ_BYTES = 16 * 2**20  # what the writer process hashes and writes per call
MESSAGE_BYTES = 2**20  # the largest message either side sends (a job, a record)


class HostBytes:
    """A tensor's bytes in the shared memory, handed to the checkpoint writer piece by piece
    (:class:`distopt.checkpoint.writer.Pieces`)."""

    def __init__(self, view: memoryview, dtype: str, shape: list[int], offset: int, nbytes: int, parent: int) -> None:
        self.dtype, self.shape = DTYPES[dtype].torch, tuple(shape)
        self._view, self._lo, self._hi, self._parent = view, offset, offset + nbytes, parent

    def pieces(self) -> Iterator[memoryview]:
        """The bytes, as the training process copied them."""
        for lo in range(self._lo, self._hi, READ_BYTES):
            if os.getppid() != self._parent:  # a write nobody will finish may not go on
                raise RuntimeError("the training process is gone")
            yield self._view[lo: min(lo + READ_BYTES, self._hi)]


def serve(sock: socket.socket) -> None:
    """The writer process: map shared memory, write checkpoints, send back their records."""
    parent, view, mapped = os.getppid(), None, None
    sock.settimeout(2.0)
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 1)
        except socket.timeout:
            if os.getppid() != parent:
                return
            continue
        except OSError:
            return
        if not data:
            return  # the training process closed its end, or is gone
        msg = msgpack.unpackb(data)
        if "map" in msg:
            if view is not None:
                view.release()
                mapped.close()
            mapped = mmap.mmap(fds[0], msg["map"], prot=mmap.PROT_READ)
            os.close(fds[0])
            view = memoryview(mapped)
            continue
        parts = [None if part is None else {name: HostBytes(view, *rest, parent) for name, *rest in part}
                 for part in (msg["shard"], msg["model"])]
        try:
            sock.send(msgpack.packb(write_files(msg["root"], msg["step"], msg["rank"], *parts)))
        except OSError:
            return


if __name__ == "__main__":
    lower_priority()
    serve(socket.socket(fileno=int(sys.argv[1])))
