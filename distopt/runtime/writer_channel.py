"""The writer process of :class:`~distopt.runtime.writer_process.ProcessWriter` and the
socket to it: starting it, handing it the shared memory and the jobs, taking its records
back, and failing the jobs it held when it is gone.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import msgpack

from distopt.runtime.host_snapshot import SharedMemory

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WriterChannel:
    """The process side of a :class:`~distopt.runtime.writer_process.ProcessWriter`, which
    sets the fields up (the process, its socket, the shared memory, the jobs sent)."""

    _proc: subprocess.Popen | None
    _sock: socket.socket | None
    _memory: SharedMemory | None
    _mapped: bool
    _packer: msgpack.Packer
    _inbox: bytearray
    _writing: list
    _done: list[dict]

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",  # it must never make a CUDA context
               "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", "distopt.runtime.writer_main", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._sock, self._mapped = ours, False

    @property
    def pid(self) -> int | None:
        """The writer process's pid (None once closed)."""
        return self._proc.pid if self._proc is not None else None

    def _shared(self, size: int, pin: bool) -> SharedMemory:
        if self._memory is None or self._memory.size < size:
            if self._memory is not None:
                self._memory.close()
            self._memory, self._mapped = SharedMemory(size), False
        if pin:
            self._memory.pin()
        if not self._mapped:
            self._send(self._packer.pack({"map": self._memory.size}), [self._memory.fd])
            self._mapped = True
        return self._memory

    def _send(self, message: bytes, fds: list[int] | None = None) -> bool:
        try:
            if fds:
                socket.send_fds(self._sock, [message], fds)
            else:
                self._sock.send(message)
            return True
        except OSError:  # the writer process is gone: its jobs fail below
            self._lost()
            return False

    def _receive(self, block: bool) -> bool:
        # Into memory kept for it: recv(n) allocates n bytes on every call, and a step's check
        # for a finished write (nothing there) then cost tens of microseconds.
        try:
            if block:
                self._sock.settimeout(1.0)  # wakes to see whether the process still lives
                n = self._sock.recv_into(self._inbox)
            else:
                n = self._sock.recv_into(self._inbox, 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, socket.timeout):
            if block and self._proc.poll() is not None:
                self._lost()
            return False
        except OSError:
            n = 0
        finally:
            if block and self._sock is not None:
                self._sock.settimeout(None)
        if not n:
            self._lost()
            return False
        data = memoryview(self._inbox)[:n]
        record = msgpack.unpackb(data)
        job = self._writing.pop(0)
        if "model" in record:
            record["fields"] = job.fields
        self._done.append(record)
        return True

    def _lost(self) -> None:
        code = self._proc.poll() if self._proc is not None else None
        self._fail(self._writing, f"the checkpoint writer process exited (code {code})")
        self._writing = []
        if self._sock is not None:
            self._sock.close()
        self._proc, self._sock, self._mapped = None, None, False

    def _fail(self, jobs: list, why: str = "the checkpoint writer process exited") -> None:
        for job in jobs:
            self._done.append({"step": job.step, "rank": job.rank, "error": f"RuntimeError: {why}"})
