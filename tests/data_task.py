"""Streams and shard files for the data tests (module level: Ray workers import them by name).

Every sample is a row ``[x (5), y (3), id]`` of the regression task in ``trainer_task``; the
id lets a test see which samples a step took.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from trainer_task import make_data

N = 90  # not a multiple of the test batches: steps cross epoch ends mid-batch


def rows(n: int = N) -> torch.Tensor:
    x, y = make_data(n).tensors
    return torch.cat([x, y, torch.arange(n, dtype=torch.float32)[:, None]], dim=1)


def make_rows() -> torch.Tensor:
    """A factory of a map-style dataset (a tensor: ``len`` and ``[i]``)."""
    return rows()


def loss(model: torch.nn.Module, batch: torch.Tensor):
    """MSE of the task on a batch of rows; the metric is the sum of the rows' ids."""
    batch = batch["row"] if isinstance(batch, dict) else batch
    x, y = batch[:, :5].float(), batch[:, 5:8].float()
    return torch.nn.functional.mse_loss(model(x), y), {"ids": batch[:, 8].sum()}


def slow_loss(model: torch.nn.Module, batch: torch.Tensor):
    """:func:`loss`, a second slower on a batch of 12 rows (the whole global batch of the
    shrink tests, on their one remaining worker): the freed worker's successor has time to start."""
    import time
    if len(batch) == 12:
        time.sleep(1.0)
    return loss(model, batch)


class RowStream(IterableDataset):
    """The rows, shuffled per epoch by ``set_epoch`` (seeded), as a stream of ``n`` samples."""

    def __init__(self, n: int = N) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + epoch)).tolist()

    def __iter__(self):
        data = rows(self.n)
        for i in self.order(self.epoch):
            yield data[i]


def make_stream() -> RowStream:
    return RowStream()


def not_a_dataset() -> int:
    return 5


def make_short_stream() -> RowStream:
    return RowStream(10)


class ChangesShape(IterableDataset):
    """A stream whose sample 7 has another shape than the first."""

    def __iter__(self):
        for i, row in enumerate(rows(40)):
            yield row[:4] if i == 7 else row


def write_shards(folder: Path, sizes=(23, 0, 31, 17, 19)) -> list[str]:
    """The rows cut into .npy shards of ``sizes`` (an empty one among them)."""
    data, paths, at = rows(sum(sizes)).numpy(), [], 0
    for i, size in enumerate(sizes):
        paths.append(str(folder / f"shard-{i:03d}.npy"))
        np.save(paths[-1], data[at:at + size])
        at += size
    return paths


def read_npy(path: str) -> np.ndarray:
    """Random access: a worker reads only its own rows."""
    return np.load(path, mmap_mode="r")


def read_npy_rows(path: str):
    """An iterator over the rows: the shard is read whole."""
    yield from np.load(path)


def read_fails_at_5(path: str):
    for i, row in enumerate(np.load(path)):
        if i == 5:
            raise OSError("disk error")
        yield row


def read_changes_at_3(path: str):
    for i, row in enumerate(np.load(path)):
        yield row[:2] if i == 3 else row


class DiesInLoader(Dataset):
    """Map-style rows whose loader process kills itself once, on reading row ``at``
    (a marker file in ``folder`` makes it once per test)."""

    def __init__(self, folder: str, at: int = 5) -> None:
        self.data, self.at, self.folder = rows(), at, folder

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        marker = Path(self.folder) / "loader-died"
        if i == self.at and get_worker_info() is not None and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.data[i]


READS: list = []  # (path, record) of every record CountingShard gave out, in this process


class CountingShard:
    """A shard of rows that logs which records are read."""

    def __init__(self, path: str) -> None:
        self.path, self.rows = path, np.load(path)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        READS.append((self.path, i))
        return self.rows[i]


def read_counting(path: str) -> CountingShard:
    return CountingShard(path)
