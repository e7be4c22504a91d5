"""Forming a torch.distributed process group: the store, the backend, the bind address.

Kept apart from the collectives themselves: everything here runs once per group, when a
:class:`~distopt.collectives.TorchCommunicator` is made or re-formed after a failure.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import time

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo

BACKENDS = ("gloo", "nccl")


def validate(rank: int, world_size: int, backend: str, timeout_s: float) -> None:
    """Raise ValueError naming the fix for a bad rank, world size, backend or timeout."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive int")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an int in [0, {world_size})")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported: use 'gloo' (CPU tensors) or 'nccl' (CUDA tensors)")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be > 0 seconds")


def connect_store(rank: int, world_size: int, host: str, port: int, timeout: datetime.timedelta) -> dist.Store:
    """Rank 0 serves a TCPStore at ``host:port``; the other ranks connect to it."""
    listen_fd = None
    if rank == 0:
        # Bind the store's socket ourselves: it then listens on `host` only (loopback
        # stays loopback), where TCPStore alone would listen on every interface.
        listen_fd = socket.create_server((host, port)).detach()  # the store owns the fd
    else:
        await_listener(host, port, timeout.total_seconds())
    return dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                         wait_for_workers=False, master_listen_fd=listen_fd)


def await_listener(host: str, port: int, timeout_s: float) -> None:
    """Return once something listens at ``host:port``, polling every few milliseconds.

    TCPStore's client retries a refused connection after pauses that grow to about half a
    second, and a rank often arrives before rank 0 listens (in a recovery rank 0 first
    rolls back its shard): a group of 2 on loopback then formed in 0.4-0.75 s instead of
    3 ms.

    Raises:
        TimeoutError: nothing listened within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() + pause > deadline:
                raise TimeoutError(f"no store listened at {host}:{port} ({e})") from None
            time.sleep(pause)
            pause = min(2 * pause, 0.02)


def make_group(backend: str, store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta,
               host: str, local_host: str | None):
    """A ProcessGroupNCCL or ProcessGroupGloo of its own (never torch's default group).

    gloo binds ``local_host``, else loopback when ``host`` is loopback, else the hostname.
    """
    if backend == "nccl":
        try:
            from torch._C._distributed_c10d import ProcessGroupNCCL
        except ImportError as e:
            raise ValueError("backend='nccl' needs a CUDA build of torch: use backend='gloo'") from e
        # torch's default (3) kills the process when its watchdog sees a timed-out
        # collective; 2 only aborts the communicator, so a survivor of a dead peer lives
        # on, gets an error from its next collective, and can recover. A user's setting wins.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return ProcessGroupNCCL(store, rank, world_size, opts)
    opts = ProcessGroupGloo._Options()
    opts._timeout = timeout
    bind = local_host or ("127.0.0.1" if _is_loopback(host) else None)
    device = ProcessGroupGloo.create_device(hostname=bind) if bind else ProcessGroupGloo.create_default_device()
    opts._devices = [device]
    return ProcessGroupGloo(store, rank, world_size, opts)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (for rank 0's store)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def existing_group(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup, str, float | None, dist.Store | None]:
    """A group torch.distributed already formed (None: the default group), with its code path
    ("nccl" or "gloo"), its timeout in seconds and its store (None where torch hides them).

    Raises:
        RuntimeError: ``group`` is None and the default group is not initialised.
        ValueError: ``group`` is not a process group, or its backend is neither gloo nor NCCL.
    """
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "comm=None uses torch.distributed's default process group, which is not initialised: "
                "call torch.distributed.init_process_group(backend='gloo' or 'nccl') first, or pass a "
                "Communicator")
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group={group!r} is not a process group this process belongs to: pass one "
                         f"torch.distributed.new_group returned on a member rank, or None for the default group")
    backend, timeout_s = _backend_and_timeout(group)
    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, ValueError, KeyError, RuntimeError):  # private API: absent or no store
        store = None
    return group, backend, timeout_s, store


def _backend_and_timeout(group: dist.ProcessGroup) -> tuple[str, float | None]:
    """The code path ("nccl" or "gloo") for ``group``'s tensors, and its timeout in seconds
    (None where this torch does not expose it; the group still enforces it)."""
    name = str(dist.get_backend(group))  # "gloo", "nccl", or per device: "cpu:gloo,cuda:nccl"
    per_device = dict(part.split(":") for part in name.split(",")) if ":" in name else {"cpu": name, "cuda": name}
    if per_device.get("cuda") == "nccl":
        backend, device = "nccl", "cuda"
    elif per_device.get("cpu") == "gloo":
        backend, device = "gloo", "cpu"
    else:
        raise ValueError(f"the group's backend is {name!r}: wrap a 'gloo' or 'nccl' group "
                         f"(torch.distributed.init_process_group(backend='gloo' or 'nccl'))")
    try:
        return backend, group._get_backend(torch.device(device)).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):  # private API, absent in some torch versions
        return backend, None
