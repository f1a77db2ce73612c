"""Scratch directories of killed processes are removed before a new write."""

import os
import subprocess
import sys

from fed_unlearn.scratch import remove_stale_parts, scratch_dir


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no such process any more


def test_stale_parts_of_dead_processes_go_live_ones_stay(tmp_path):
    dead, me = _dead_pid(), os.getpid()
    stale = tmp_path / f"fl-abc.part{dead}"
    (stale / "history").mkdir(parents=True)
    live = tmp_path / f"fl-def.part{me}"
    live.mkdir()
    parent_pid = tmp_path / f"fl-ghi.part{os.getppid()}"  # a live process
    parent_pid.mkdir()
    keep = [tmp_path / "fl-abc", tmp_path / "fl-x.partial", tmp_path / "notes.part"]
    for p in keep:
        p.mkdir()
    assert remove_stale_parts(tmp_path) == [stale]
    assert not stale.exists()
    assert live.exists() and parent_pid.exists() and all(p.exists() for p in keep)
    assert remove_stale_parts(tmp_path / "missing") == []


def test_scratch_dir_is_fresh_and_cleans_its_parent(tmp_path):
    final = tmp_path / "fl-key"
    old = tmp_path / f"fl-other.part{_dead_pid()}"
    old.mkdir()
    mine = tmp_path / f"fl-key.part{os.getpid()}"
    (mine / "leftover").mkdir(parents=True)
    tmp = scratch_dir(final)
    assert tmp == mine and not tmp.exists()  # this process's earlier try is gone
    assert not old.exists()
