"""What a checkpoint's pieces cost on this machine, one at a time (no goals, no peer).

* the write into the page cache of one benchmark-MLP shard file (about 38 MB: a worker's
  state and slice of the weights at N=2), in ``write()`` calls of several sizes,
  interleaved over rounds. With ``--keep`` the files stay, as checkpoints do: on the
  benchmark VM every variant then went from about 10 ms to about 90-120 ms once a few
  hundred MB were written, whatever the call size (dirty pages wait for write-back);
* the staging copy of those 38 MB (``torch.Tensor.copy_``) and the sha256 over them;
* a whole shard file through ``distopt.checkpoint.write_shard`` (sha256, write, fsync), as
  the worker did it before (copy into staging memory, then write whole tensors) and as it
  does now (read in place in 1 MiB pieces through a private buffer,
  ``distopt.runtime.live_shard``): wall time and the writing thread's CPU time.

Run: ``python -m benchmarks.checkpoint_io [--rounds 5] [--dir /tmp] [--keep]``. Prints
milliseconds per variant, each round's value and the median.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time

import torch

from benchmarks.common import median
from distopt.checkpoint import make_checkpoint_dir, step_dir, write_shard
from distopt.runtime.live_shard import LiveShard

SHARD_BYTES = 38 * 2**20
PIECES = {"one call": None, "16 MiB": 1 << 24, "4 MiB": 1 << 22, "1 MiB": 1 << 20, "64 KiB": 1 << 16}


def _write(path: str, data: memoryview, piece: int | None) -> None:
    with open(path, "xb") as f:
        if piece is None:
            f.write(data)
        else:
            for start in range(0, data.nbytes, piece):
                f.write(data[start:start + piece])


def _shard_fields() -> dict[str, list[torch.Tensor]]:
    """A worker's shard as the optimizer holds it: 3 fields, each in 2 bucket tensors."""
    n = SHARD_BYTES // 4 // 3
    return {name: list(torch.randn(n).split([n // 2, n - n // 2])) for name in ("exp_avg", "exp_avg_sq", "param")}


def _write_shard(root: str, step: int, fields: dict, staging: dict, in_place: bool) -> tuple[float, float]:
    """Wall and CPU milliseconds of one shard file written the old or the new way."""
    t0, c0 = time.perf_counter(), time.thread_time()
    if in_place:
        shard = LiveShard(fields, lambda name, numel: staging[name]).tensors()
    else:
        shard = {name: torch.cat(ts, out=staging[name]) for name, ts in fields.items()}
    write_shard(make_checkpoint_dir(root, step), 0, shard)
    return 1e3 * (time.perf_counter() - t0), 1e3 * (time.thread_time() - c0)


def measure(rounds: int, folder: str, keep: bool = False) -> dict[str, list[float]]:
    """Milliseconds per round for each write variant, the staging copy and the hash.

    ``keep`` leaves the written files in place until the end, as checkpoints stay (their
    pages are dirty until written back); otherwise each is removed after its write."""
    torch.set_num_threads(1)
    src = torch.randn(SHARD_BYTES // 4)
    dst = torch.empty_like(src)
    data = memoryview(src.numpy()).cast("B")
    fields = _shard_fields()
    staging = {name: torch.empty(sum(t.numel() for t in ts)) for name, ts in fields.items()}
    shard_ways = {"copied": False, "in place": True}
    times: dict[str, list[float]] = {name: [] for name in [*PIECES, "staging copy", "sha256"]}
    times.update({f"shard {way} {kind}": [] for way in shard_ways for kind in ("wall", "cpu")})
    with tempfile.TemporaryDirectory(dir=folder) as root:
        for r in range(rounds):
            for i, (way, in_place) in enumerate(shard_ways.items() if r % 2 == 0 else reversed(shard_ways.items())):
                wall, cpu = _write_shard(root, 2 * r + i, fields, staging, in_place)
                times[f"shard {way} wall"].append(wall)
                times[f"shard {way} cpu"].append(cpu)
                if not keep:
                    shutil.rmtree(step_dir(root, 2 * r + i))
            for name, piece in PIECES.items():
                path = os.path.join(root, f"{r}-{piece}")
                t0 = time.perf_counter()
                _write(path, data, piece)
                times[name].append(1e3 * (time.perf_counter() - t0))
                if not keep:
                    os.remove(path)  # its dirty pages go with it: every variant starts alike
            t0 = time.perf_counter()
            dst.copy_(src)
            times["staging copy"].append(1e3 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            hashlib.sha256(data).hexdigest()
            times["sha256"].append(1e3 * (time.perf_counter() - t0))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="folder on the file system to measure")
    p.add_argument("--keep", action="store_true", help="keep every file until the end, as checkpoints stay")
    args = p.parse_args()
    print(f"{SHARD_BYTES / 2**20:.0f} MiB per variant, {args.rounds} rounds, files under {args.dir}"
          f"{', kept' if args.keep else ''}")
    for name, ms in measure(args.rounds, args.dir, args.keep).items():
        print(f"  {name:>20}: median {median(ms):7.1f} ms   rounds " + " ".join(f"{x:.0f}" for x in ms))


if __name__ == "__main__":
    main()
