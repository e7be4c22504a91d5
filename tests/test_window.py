"""Shared-memory windows between ring neighbours on one host."""
from __future__ import annotations

import os

import torch

from distopt.collectives import in_process, run_ranks
from distopt.collectives import window as window_mod
from distopt.collectives.window import open_window


def _leftovers() -> set[str]:
    return {f for f in os.listdir(window_mod.SHM_DIR) if f.startswith("distopt-")}


def test_a_rank_reads_what_its_neighbour_writes_and_no_file_stays():
    before = _leftovers()
    for d in (1, 2):
        def body(comm):
            win = open_window(comm, 40, -d)
            win.mine.view(torch.float32).fill_(float(comm.rank))
            comm.barrier()
            seen = win.peer.view(torch.float32).clone()
            comm.barrier()
            return seen
        for r, seen in enumerate(run_ranks(in_process(4, timeout_s=10), body)):
            assert torch.equal(seen, torch.full((10,), float((r - d) % 4)))
    assert _leftovers() == before  # unlinked once mapped: a killed process leaks nothing


def test_no_window_anywhere_when_one_rank_cannot_map(monkeypatch):
    real_attach = window_mod._attach

    def attach(path, nbytes):  # rank 1's file is "on another host"
        return None if path.endswith("-1") else real_attach(path, nbytes)
    monkeypatch.setattr(window_mod, "_attach", attach)
    got = run_ranks(in_process(3, timeout_s=10), lambda c: open_window(c, 32, -1))
    assert got == [None, None, None]


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("DISTOPT_SHM", "0")
    assert run_ranks(in_process(2, timeout_s=10), lambda c: open_window(c, 32, -1)) == [None, None]


def test_no_room_in_shm_means_no_window_and_a_warning_naming_the_fix(monkeypatch, caplog):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    before = _leftovers()
    assert run_ranks(in_process(2, timeout_s=10), lambda c: open_window(c, 32, -1)) == [None, None]
    assert _leftovers() == before
    assert "cannot reserve 32 bytes in /dev/shm (No space left on device" in caplog.text
    assert "--shm-size" in caplog.text
